"""Discovery against the real stack: registration contract, TTLs, long polls, the client side."""

from __future__ import annotations

import asyncio
import time
import uuid
from typing import Any

import pytest

from common.discovery import InstanceView, Registration
from common.internal import SERVICE_TOKEN_HEADER, read_secret
from tests.http import call
from tests.procs import start_service
from tests.util import wait_until


@pytest.fixture(scope="module")
def secret(stack) -> str:
    return read_secret(stack.layout.service_secret)


def svc_type() -> str:
    # A type of our own per test: the stack's real services are registered beside us.
    return f"t{uuid.uuid4().hex[:10]}"


async def registry(method: str, url: str, secret: str | None = None, body: object | None = None) -> tuple[int, Any]:
    """A call to discovery: the status and the JSON answer (a long poll may wait 20 s)."""
    headers = {"Content-Type": "application/json"}
    if secret:
        headers[SERVICE_TOKEN_HEADER] = secret
    reply = await call(method, url, body, headers=headers, timeout=60)
    return reply.code, reply.json


async def test_register_requires_type_and_host_seed_message(stack, secret) -> None:
    url = stack.url("discovery") + "/register"
    for body in ({"host": "127.0.0.1", "port": 1}, {"type": "x", "port": 1}, {"type": "", "host": "h", "port": 1}, {}):
        status, reply = await registry("POST", url, secret, body)
        assert (status, reply) == (400, {"detail": "Host and service type are required."})
    status, reply = await registry("POST", url, secret, {"type": "x", "host": "h"})
    assert status == 400 and "Port" in reply["detail"]
    status, reply = await registry("POST", url, secret, {"type": "Bad Type!", "host": "h", "port": 1})
    assert status == 400 and reply["detail"].startswith("type:")
    status, reply = await registry("POST", url, secret, {"type": "x", "host": "h", "port": 70000})
    assert status == 400 and reply["detail"].startswith("port:")
    r = await call("POST", url, raw=b"{not json", headers={SERVICE_TOKEN_HEADER: secret})
    assert r.code == 400 and r.json["detail"] == "body is not valid JSON"


async def test_registration_calls_require_the_service_credential(stack) -> None:
    base = stack.url("discovery")
    body = {"type": svc_type(), "host": "127.0.0.1", "port": 1}
    assert (await registry("POST", base + "/register", None, body))[0] == 403
    assert (await registry("POST", base + "/register", "wrong", body))[0] == 403
    assert (await registry("PUT", base + "/register/x-1", "wrong"))[0] == 403
    assert (await registry("DELETE", base + "/register/x-1", None))[0] == 403


async def test_register_list_heartbeat_deregister(stack, secret) -> None:
    base = stack.url("discovery")
    t = svc_type()
    status, reg = await registry("POST", base + "/register", secret, {"type": t, "host": "127.0.0.1", "port": 4001})
    assert status == 201 and reg["ttl"] > 0 and reg["instance_id"].startswith(t)
    status, listing = await registry("GET", base + f"/services/{t}")
    assert status == 200 and listing["type"] == t
    assert listing["instances"] == [{"instance_id": reg["instance_id"], "type": t, "host": "127.0.0.1", "port": 4001}]
    v1 = listing["version"]
    assert (await registry("PUT", base + f"/register/{reg['instance_id']}", secret))[0] == 200
    # The same address registering again (a restarted process) replaces the old record.
    status, again = await registry("POST", base + "/register", secret, {"type": t, "host": "127.0.0.1", "port": 4001})
    listing = (await registry("GET", base + f"/services/{t}"))[1]
    assert [i["instance_id"] for i in listing["instances"]] == [again["instance_id"]] and listing["version"] != v1
    assert (await registry("PUT", base + f"/register/{reg['instance_id']}", secret))[0] == 404
    status, reply = await registry("DELETE", base + f"/register/{again['instance_id']}", secret)
    assert status == 200 and reply["deregistered"] is True
    assert (await registry("GET", base + f"/services/{t}"))[1]["instances"] == []
    assert (await registry("PUT", base + f"/register/{again['instance_id']}", secret))[0] == 404
    status, _ = await registry("GET", base + "/services/Not_A*Type")
    assert status in (400, 404)


async def test_long_poll_answers_at_once_on_change(stack, secret) -> None:
    base = stack.url("discovery")
    t = svc_type()
    listing = (await registry("GET", base + f"/services/{t}"))[1]
    assert listing["instances"] == []
    started = time.monotonic()
    poll = asyncio.create_task(registry("GET", base + f"/services/{t}?version={listing['version']}&wait=20"))

    async def waiting() -> bool:
        return (await registry("GET", base + "/status"))[1]["watching"].get(t, 0) == 1

    await wait_until(waiting, timeout=5, message="the long poll is waiting")
    status, reg = await registry("POST", base + "/register", secret, {"type": t, "host": "127.0.0.1", "port": 4002})
    status, changed = await asyncio.wait_for(poll, 10)
    assert status == 200 and [i["instance_id"] for i in changed["instances"]] == [reg["instance_id"]]
    assert changed["version"] != listing["version"]
    assert time.monotonic() - started < 15  # answered by the change, not by the 20 s wait
    # Unchanged version and a short wait: the same listing after the wait.
    status, same = await registry("GET", base + f"/services/{t}?version={changed['version']}&wait=0.2")
    assert status == 200 and same["version"] == changed["version"]
    await registry("DELETE", base + f"/register/{reg['instance_id']}", secret)
    status, _reply = await registry("GET", base + f"/services/{t}?wait=abc")
    assert status == 400


async def test_instance_without_heartbeat_disappears_and_watchers_learn(stack, secret) -> None:
    """A discovery with a 1 s TTL (same Redis): a registration not renewed is gone soon after."""
    async with await start_service(
        stack, "discovery", extra_env={"INSTANCE_TTL_S": "1", "SWEEP_INTERVAL_S": "0.2"}, health_path="/status"
    ) as disc:
        t = svc_type()
        status, reg = await registry(
            "POST", disc.url + "/register", secret, {"type": t, "host": "127.0.0.1", "port": 4003}
        )
        assert status == 201 and reg["ttl"] == 1.0
        listing = (await registry("GET", disc.url + f"/services/{t}"))[1]
        assert len(listing["instances"]) == 1
        status, after = await registry("GET", disc.url + f"/services/{t}?version={listing['version']}&wait=10")
        assert status == 200 and after["instances"] == []
        status, st = await registry("GET", disc.url + "/status")
        assert st["status"] == "ok" and st["redis"] == "ok" and t not in st["services"]


async def test_client_registration_and_view(stack, secret) -> None:
    """common.discovery: Registration heartbeats and deregisters; InstanceView follows at once."""
    t = svc_type()
    view = InstanceView(stack.layout.discovery_url, t, wait_s=10)
    await view.start(initial_timeout_s=5)
    changes: list[int] = []
    view.on_change(lambda instances: changes.append(len(instances)))
    assert view.instances == () and view.reachable
    regs = [Registration(stack.layout.discovery_url, t, "127.0.0.1", port, secret) for port in (4010, 4011)]
    for r in regs:
        r.start()
    try:
        await wait_until(lambda: len(view.instances) == 2, timeout=10, message="both instances in the view")
        assert {i.port for i in view.instances} == {4010, 4011}
        await regs[0].stop()
        await wait_until(lambda: {i.port for i in view.instances} == {4011}, timeout=10, message="deregistered")
        assert changes[-1] == 1
    finally:
        for r in regs:
            await r.stop()
        await view.stop()


async def test_status_and_all_services(stack) -> None:
    # Earlier tests may have killed extra instances, whose entries live until their TTL.
    async def settled() -> dict | None:
        status, st = await registry("GET", stack.url("discovery") + "/status")
        assert status == 200
        return st if st["services"].get("authen") == 2 else None

    st = await wait_until(settled, timeout=30, interval=0.2, message="only the stack's two authen instances")
    assert st["service"] == "discovery" and st["redis"] == "ok"
    status, everything = await registry("GET", stack.url("discovery") + "/services")
    assert status == 200 and len(everything["services"]["authen"]["instances"]) == 2
