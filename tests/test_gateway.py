"""The gateway against the real stack: routing, identity, balancing, limits, timeouts,
retries, rate limits, WebSockets, status and metrics."""

from __future__ import annotations

import asyncio
import json
import re
import uuid

import aiohttp
import pytest

from tests.test_gateway_support import (
    ECHO_CLOSES,
    ECHO_TYPE,
    authen_addresses,
    authen_status,
    echo_upstream,
    fetch,
    gateway_instances,
    gateway_status,
    log_events,
    sleepy_received,
    start_gateway,
    token_for,
    wait_routed,
)
from tests.util import wait_until


@pytest.fixture
def gw(stack) -> str:
    return stack.url("gateway")


async def test_round_robin_splits_evenly(stack, http, gw) -> None:
    await wait_routed(http, gw, "authen", 2)
    seen = []
    for _ in range(100):
        r = await fetch(http, "GET", gw + "/authen/utilities/status")
        assert r.status == 200, r
        seen.append(r.json["instance"])
    counts = {a: seen.count(a) for a in authen_addresses(stack)}
    assert sum(counts.values()) == 100, seen
    assert all(48 <= c <= 52 for c in counts.values()), counts


async def test_signup_signin_and_protected_paths(stack, http, gw) -> None:
    username = f"gw_{uuid.uuid4().hex[:10]}"
    body = {
        "username": username,
        "password": "correct horse",
        "first_name": "Ann",
        "last_name": "Lee",
        "type": "customer",
    }
    r = await fetch(http, "POST", gw + "/authen/authen/signup", body=body)
    assert r.status == 201, r
    r = await fetch(
        http, "POST", gw + "/authen/authen/signin", body={"username": username, "password": "correct horse"}
    )
    assert r.status == 200, r
    token, user_id = r.json["token"], r.json["user_id"]
    assert (await fetch(http, "GET", gw + "/authen/list/employee")).status == 200
    # Everything else needs a valid token.
    check = gw + f"/authen/utilities/check?user_id={user_id}"
    r = await fetch(http, "GET", check)
    assert r.status == 401 and "detail" in r.json
    r = await fetch(http, "GET", check, headers={"Authorization": "Bearer not.a.token"})
    assert r.status == 401 and r.json["detail"] == "invalid or expired token"
    expired = token_for(stack, user_id, ttl_s=-10)
    assert (await fetch(http, "GET", check, headers={"Authorization": f"Bearer {expired}"})).status == 401
    r = await fetch(http, "GET", check, headers={"Authorization": f"Bearer {token}"})
    assert r.status == 200 and r.json["username"] == username
    # An invalid token on a public path is ignored, not refused.
    assert (await fetch(http, "GET", gw + "/authen/list/employee", headers={"Authorization": "Bearer x"})).status == 200


async def test_request_id_generated_propagated_returned(stack, http, gw) -> None:
    r = await fetch(http, "GET", gw + "/authen/utilities/status")
    generated = r.headers["X-Request-ID"]
    assert re.fullmatch(r"[0-9a-f]{32}", generated)
    rid = f"test-{uuid.uuid4().hex}"
    r = await fetch(http, "GET", gw + "/authen/utilities/status", headers={"X-Request-ID": rid})
    assert r.status == 200 and r.headers["X-Request-ID"] == rid
    instance = r.json["instance"]
    index = authen_addresses(stack).index(instance)

    def logged() -> bool:
        lines = (stack.layout.logs_dir / f"authen-{index + 1}.log").read_text(errors="replace").splitlines()
        return any(rid in line for line in lines)

    await wait_until(logged, timeout=10, message="the request id in the authen instance's log")

    def gateway_logged() -> bool:
        # The gateway writes access lines in batches (gateway.accesslog): wait for this one.
        gw_lines = (stack.layout.logs_dir / "gateway.log").read_text(errors="replace").splitlines()
        return any(
            json.loads(line).get("http", {}).get("request", {}).get("id") == rid for line in gw_lines if rid in line
        )

    assert await wait_until(gateway_logged, timeout=10, message="the request id in the gateway's access line")


async def test_internal_paths_never_forwarded(stack, http, gw) -> None:
    token = token_for(stack)
    for path in ("/authen/internal/x", "/chat/internal/prepare", "/authen/%69nternal/x", "/authen/a/../internal/x"):
        r = await fetch(http, "GET", gw + path, headers={"Authorization": f"Bearer {token}"})
        assert r.status == 404 and "detail" in r.json, (path, r)
        r = await fetch(http, "POST", gw + path, data=b"{}")
        assert r.status == 404, (path, r)
    assert (await fetch(http, "GET", gw + "/nothing/here")).status == 404


async def test_oversize_body_refused_at_the_gateway_with_json(stack, http, gw) -> None:
    # Past Tornado's own 16 MiB cap too (a bare 400 without the delegate in front of it).
    for size in (100_000, 20_000_000):
        r = await fetch(
            http, "POST", gw + "/authen/authen/signup", data=b"z" * size, headers={"Content-Type": "application/json"}
        )
        assert r.status == 413 and "larger than" in r.json["detail"], (size, r)
        assert r.headers.get("X-Request-ID")
    assert (await fetch(http, "GET", gw + "/authen/utilities/status")).status == 200


async def test_proxy_fidelity_and_header_hygiene(stack, http) -> None:
    async with (
        echo_upstream(stack) as address,
        await start_gateway(stack, gateway_services=f"authen,chat,{ECHO_TYPE}") as g,
    ):
        await wait_routed(http, g.url, ECHO_TYPE, 1)
        token = token_for(stack, user_id=42, user_type="employee")
        headers = [
            ("Authorization", f"Bearer {token}"),
            ("X-User", "1"),
            ("X-User-Type", "admin"),
            ("Connection", "keep-alive, X-Hop"),
            ("X-Hop", "secret"),
            ("Proxy-Authorization", "Basic eA=="),
            ("X-Service-Token", "guess"),
            ("X-Custom", "a"),
            ("X-Custom", "b"),
            ("Content-Type", "text/plain"),
        ]
        r = await fetch(
            http, "PATCH", g.url + f"/{ECHO_TYPE}/some/path?q=1&q=2&x=%20y", headers=headers, data=b"raw body \x00\xff"
        )
        assert r.status == 200, r
        seen = r.json
        assert seen["method"] == "PATCH" and seen["path"] == "/some/path" and seen["query"] == "q=1&q=2&x=%20y"
        assert seen["body"].startswith("raw body")
        up = [(k.lower(), v) for k, v in seen["headers"]]
        assert [v for k, v in up if k == "x-user"] == ["42"]
        assert [v for k, v in up if k == "x-user-type"] == ["employee"]
        assert [v for k, v in up if k == "x-custom"] == ["a", "b"]
        for gone in ("x-hop", "proxy-authorization", "x-service-token"):
            assert gone not in dict(up), gone
        assert dict(up)["x-request-id"] == r.headers["X-Request-ID"]
        assert dict(up)["host"] == address
        assert dict(up)["x-forwarded-for"] == "127.0.0.1"
        # Status and headers come back as the upstream sent them.
        assert r.headers.getall("Set-Cookie") == ["a=1", "b=2"] and r.headers["X-Upstream"] == "echo"
        r = await fetch(
            http, "DELETE", g.url + f"/{ECHO_TYPE}/x?status=418", headers={"Authorization": f"Bearer {token}"}
        )
        assert r.status == 418 and r.json["method"] == "DELETE"
        # A spoofed X-User without a token is not even forwarded: 401.
        r = await fetch(http, "GET", g.url + f"/{ECHO_TYPE}/x", headers={"X-User": "1"})
        assert r.status == 401


async def test_websocket_proxied_both_ways(stack, http) -> None:
    async with echo_upstream(stack), await start_gateway(stack, gateway_services=f"authen,chat,{ECHO_TYPE}") as g:
        await wait_routed(http, g.url, ECHO_TYPE, 1)
        token = token_for(stack, user_id=9)
        ws_base = g.url.replace("http://", "ws://") + f"/{ECHO_TYPE}/ws"
        async with http.ws_connect(ws_base + f"?token={token}", headers={"X-User": "1"}) as ws:
            hello = json.loads((await ws.receive(timeout=10)).data)
            assert hello["x_user"] == "9" and hello["x_request_id"]
            await ws.send_str("hello")
            assert (await ws.receive(timeout=10)).data == "hello"
            await ws.send_bytes(b"\x00\x01binary")
            msg = await ws.receive(timeout=10)
            assert msg.type == aiohttp.WSMsgType.BINARY and msg.data == b"\x00\x01binary"
            await ws.send_str("close:4123")
            msg = await ws.receive(timeout=10)
            assert msg.type == aiohttp.WSMsgType.CLOSE and msg.data == 4123
        # The client's close code reaches the instance too.
        async with http.ws_connect(ws_base + f"?token={token}") as ws:
            await ws.receive(timeout=10)
            await ws.close(code=4000)
        await wait_until(lambda: ECHO_CLOSES and ECHO_CLOSES[-1] == 4000, timeout=10, message="4000 upstream")
        # Browsers: the token as the subprotocol pair ["bearer", <token>].
        async with http.ws_connect(ws_base, protocols=("bearer", token)) as ws:
            assert ws.protocol == "bearer"
            assert json.loads((await ws.receive(timeout=10)).data)["x_user"] == "9"
        # No token, or a bad one: accepted, then closed with 4401.
        for url in (ws_base, ws_base + "?token=bad"):
            async with http.ws_connect(url) as ws:
                msg = await ws.receive(timeout=10)
                assert msg.type == aiohttp.WSMsgType.CLOSE and msg.data == 4401
        r = await fetch(
            http,
            "GET",
            g.url + f"/{ECHO_TYPE}/internal/ws",
            headers={
                "Upgrade": "websocket",
                "Connection": "Upgrade",
                "Sec-WebSocket-Version": "13",
                "Sec-WebSocket-Key": "dGhlIHNhbXBsZSBub25jZQ==",
            },
        )
        assert r.status == 404


async def test_chat_socket_through_the_gateway(stack, http, gw) -> None:
    """The real chat socket, both ways, through the stack's gateway."""

    async def user(type_: str) -> tuple[int, str]:
        name = f"gwc_{uuid.uuid4().hex[:10]}"
        body = {"username": name, "password": "correct horse", "first_name": "F", "last_name": type_, "type": type_}
        assert (await fetch(http, "POST", gw + "/authen/authen/signup", body=body)).status == 201
        r = await fetch(
            http, "POST", gw + "/authen/authen/signin", body={"username": name, "password": "correct horse"}
        )
        return r.json["user_id"], r.json["token"]

    await wait_routed(http, gw, "chat", 2)
    (cust, ctok), (emp, etok) = await user("customer"), await user("employee")
    r = await fetch(
        http, "POST", gw + f"/chat/chats/start?employee_id={emp}", headers={"Authorization": f"Bearer {ctok}"}
    )
    assert r.status in (200, 201), r
    chat_id = r.json["chat_id"]
    ws_url = gw.replace("http://", "ws://") + f"/chat/chat/{chat_id}"
    async with (
        http.ws_connect(ws_url + f"?token={ctok}") as c,
        http.ws_connect(ws_url, protocols=("bearer", etok)) as e,
    ):
        await c.send_str(json.dumps({"type": "chat_message", "message": "hi barber"}))

        async def next_chat(ws: aiohttp.ClientWebSocketResponse) -> dict:
            while True:
                msg = json.loads((await ws.receive(timeout=15)).data)
                if msg.get("type") == "chat_message":
                    return msg

        got_e, got_c = await next_chat(e), await next_chat(c)
        assert got_e["message"] == got_c["message"] == "hi barber"
        assert got_e["sender"]["id"] == cust
        await e.send_str(json.dumps({"type": "chat_message", "message": "hello customer"}))
        assert (await next_chat(c))["message"] == "hello customer"


async def test_status_and_metrics(stack, http, gw) -> None:
    await fetch(http, "GET", gw + "/authen/utilities/status")
    st = await gateway_status(http, gw)
    assert st["service"] == "gateway" and st["limits"] == "shared" and st["redis"] == "ok"
    instances = st["services"]["authen"]["instances"]
    assert {i["address"] for i in instances} == set(authen_addresses(stack))
    for i in instances:
        assert i["breaker"]["state"] == "closed" and i["in_flight"] == 0 and "last_s" in i["load_per_s"]
    r = await fetch(http, "GET", gw + "/metrics")
    assert r.status == 200 and r.headers["Content-Type"].startswith("text/plain")
    text = r.body.decode()
    assert re.search(r'gateway_requests_total\{.*route="/authen/utilities".*status="200"', text)
    assert "gateway_request_duration_seconds_bucket" in text
    assert "gateway_breaker_transitions_total" in text or "gateway_breaker_open" in text
    assert "gateway_rejections_total" in text or "# HELP gateway_rejections" in text


@pytest.mark.parametrize("scope", ["shared", "local"])
async def test_task_limit_503_seed_demo(stack, http, scope: str) -> None:
    """Limit 1, TIMEOUT_MS 9000: a sleepy on each instance makes the third request 503."""
    async with await start_gateway(stack, task_limit_per_service=1, timeout_ms=9000, task_limit_scope=scope) as g:
        await wait_routed(http, g.url, "authen", 2)
        sleepers = [
            asyncio.create_task(fetch(http, "GET", g.url + "/authen/utilities/sleepy?seconds=5")) for _ in range(2)
        ]

        async def both_busy() -> bool:
            return all(i["in_flight"] == 1 for i in (await gateway_instances(http, g.url)).values())

        await wait_until(both_busy, timeout=5, message="a sleepy in flight on each instance")
        r = await fetch(http, "GET", g.url + "/authen/utilities/status")
        assert r.status == 503 and "authen" in r.json["detail"] and r.headers.get("Retry-After")
        done = await asyncio.gather(*sleepers)
        assert [d.status for d in done] == [200, 200]
        assert {d.json["instance"] for d in done} == set(authen_addresses(stack))
        # Nothing leaked: the slots are free again.
        assert (await fetch(http, "GET", g.url + "/authen/utilities/status")).status == 200
        assert all(i["in_flight"] == 0 for i in (await gateway_instances(http, g.url)).values())


async def test_task_limit_exact_under_concurrency(stack, http) -> None:
    async with await start_gateway(stack, task_limit_per_service=2, timeout_ms=9000) as g:
        await wait_routed(http, g.url, "authen", 2)
        # Long enough that all twelve reach the gateway while the first four still run.
        replies = await asyncio.gather(
            *(fetch(http, "GET", g.url + "/authen/utilities/sleepy?seconds=5") for _ in range(12))
        )
        statuses = sorted(r.status for r in replies)
        assert statuses == [200] * 4 + [503] * 8, statuses
        per_instance = [r.json["instance"] for r in replies if r.status == 200]
        assert sorted(per_instance.count(a) for a in authen_addresses(stack)) == [2, 2]


async def test_timeout_504_names_the_instance(stack, http) -> None:
    async with await start_gateway(stack, timeout_ms=800) as g:
        await wait_routed(http, g.url, "authen", 2)
        r = await fetch(http, "GET", g.url + "/authen/utilities/sleepy?seconds=3")
        assert r.status == 504
        m = re.fullmatch(r"Request passed to (127\.0\.0\.1:\d+) has timed out\.", r.json["detail"])
        assert m and m.group(1) in authen_addresses(stack), r.json


async def test_post_never_replayed_get_retried(stack, http) -> None:
    """A POST that reached an instance is not sent again; an idempotent GET is retried."""
    async with await start_gateway(
        stack, timeout_ms=3000, attempt_timeout_ms=500, max_retries=3, breaker_failures=100
    ) as g:
        await wait_routed(http, g.url, "authen", 2)
        before = await sleepy_received(http, stack)
        r = await fetch(http, "POST", g.url + "/authen/utilities/sleepy?seconds=1")
        assert r.status == 504, r
        assert await sleepy_received(http, stack) == before + 1
        before = await sleepy_received(http, stack)
        r = await fetch(http, "GET", g.url + "/authen/utilities/sleepy?seconds=1")
        # Each instance once (another instance per retry), then no instance is left.
        assert r.status == 504, r
        assert await sleepy_received(http, stack) == before + 2
        metrics = (await fetch(http, "GET", g.url + "/metrics")).body.decode()
        retries = [line for line in metrics.splitlines() if line.startswith("gateway_retries_total")]
        assert retries == ['gateway_retries_total{reason="timeout",service="authen"} 1.0'], retries


async def test_least_outstanding_avoids_the_busy_instance(stack, http) -> None:
    async with await start_gateway(stack, lb_policy="least_outstanding", timeout_ms=9000) as g:
        await wait_routed(http, g.url, "authen", 2)
        sleeper = asyncio.create_task(fetch(http, "GET", g.url + "/authen/utilities/sleepy?seconds=5"))

        async def one_busy() -> str | None:
            busy = [a for a, i in (await gateway_instances(http, g.url)).items() if i["in_flight"] == 1]
            return busy[0] if busy else None

        busy = await wait_until(one_busy, timeout=5, message="the sleepy in flight")
        served = [(await fetch(http, "GET", g.url + "/authen/utilities/status")).json["instance"] for _ in range(10)]
        assert busy not in served and len(set(served)) == 1, (busy, served)
        assert (await sleeper).json["instance"] == busy
        # Both idle again: the load spreads over both.
        served = [(await fetch(http, "GET", g.url + "/authen/utilities/status")).json["instance"] for _ in range(10)]
        assert set(served) == set(authen_addresses(stack))


async def test_rate_limit_429_with_retry_after(stack, http) -> None:
    rules = json.dumps(
        [
            {"path": "/authen/utilities/status", "rate_per_s": 0.2, "burst": 3},
            {"path": "/authen/authen/signin", "methods": ["POST"], "rate_per_s": 0.2, "burst": 2},
        ]
    )
    async with await start_gateway(stack, rate_limits=rules) as g:
        await wait_routed(http, g.url, "authen", 2)
        statuses = [(await fetch(http, "GET", g.url + "/authen/utilities/status")).status for _ in range(4)]
        assert statuses == [200, 200, 200, 429]
        r = await fetch(http, "GET", g.url + "/authen/utilities/status")
        assert r.status == 429 and int(r.headers["Retry-After"]) >= 1 and "detail" in r.json
        bad = {"username": "nobody_" + uuid.uuid4().hex[:8], "password": "wrong password"}
        statuses = [(await fetch(http, "POST", g.url + "/authen/authen/signin", body=bad)).status for _ in range(3)]
        assert statuses == [401, 401, 429]
        # Other paths are not limited.
        assert (await fetch(http, "GET", g.url + "/authen/list/employee")).status == 200
        metrics = (await fetch(http, "GET", g.url + "/metrics")).body.decode()
        assert re.search(r'gateway_rejections_total\{reason="rate_limit",service="authen"\} 3\.0', metrics)


async def test_load_alert_names_the_instance(stack, http) -> None:
    async with await start_gateway(stack, load_threshold_per_s_per_service=3) as g:
        await wait_routed(http, g.url, "authen", 2)
        # 20 quick requests: well over 3 per second per instance.
        await asyncio.gather(*(fetch(http, "GET", g.url + "/authen/utilities/status") for _ in range(20)))

        def alerts() -> list[dict]:
            return [e for e in log_events(g) if e.get("event", {}).get("kind") == "alert"]

        found = await wait_until(alerts, timeout=10, message="an ECS alert event in the gateway log")
        assert found[0]["barber"]["upstream"]["instance"] in authen_addresses(stack)
        assert found[0]["event"]["action"] == "load-alert"
        assert "ALERT: Load on authen [" in found[0]["message"] and found[0]["log.level"] == "warning"


async def test_authen_direct_status_unaffected(stack, http) -> None:
    """Sanity: the instances the gateway routes to answer directly too (used by other tests)."""
    for i in (0, 1):
        st = await authen_status(http, stack, i)
        assert st["instance"] == authen_addresses(stack)[i] and "sleepy" in st
