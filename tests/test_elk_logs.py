"""Real ECS lines from the running stack, checked against the logs index template: after
traffic through the gateway (sign-ups, chats, 2PC and saga deletions, errors, a breaker
that opens and closes, a load alert), every field of every line of every service is
mapped and has the mapped type; alerts carry event.kind/event.action and their level."""

from __future__ import annotations

import json
import uuid
from pathlib import Path
from typing import Any

import pytest

from coordinator.deletion import tx_fields
from elk import templates as t
from elk.templates import get_field
from stack.services import SERVICES
from tests.http import call
from tests.procs import ServiceProcess
from tests.stackproc import StackProcess
from tests.test_coordinator import delete, make_party
from tests.test_gateway_support import ECHO_TYPE, echo_upstream, start_gateway, token_for, wait_routed
from tests.util import wait_until


def read_lines(path: Path, strict: bool = True) -> list[dict[str, Any]]:
    """The JSON lines of a log; ``strict=False`` skips a line cut short by a killed process."""
    events = []
    for n, line in enumerate(path.read_text(errors="replace").splitlines(), 1):
        if not line.startswith("{"):
            continue  # not ours: e.g. a third-party library's print; Filebeat marks those
        try:
            events.append(json.loads(line))
        except ValueError as e:
            if not strict:
                continue
            raise AssertionError(f"{path.name}:{n} is not one JSON object: {line[:200]}") from e
    return events


def problems_in(events: list[dict[str, Any]], where: str) -> list[str]:
    out = []
    for event in events:
        out += [f"{where}: {p} in {event.get('message', '')[:80]!r}" for p in t.mapping_problems(event)]
    return out


def actions(events: list[dict[str, Any]], action: str) -> list[dict[str, Any]]:
    return [e for e in events if get_field(e, "event.action") == action]


async def breaker_and_load_traffic(stack: StackProcess, g: ServiceProcess, http: Any) -> list[dict[str, Any]]:
    """A gateway of our own opens a breaker on a failing upstream, closes it again, and
    raises a load alert; its log lines."""
    token = {"Authorization": f"Bearer {token_for(stack)}"}
    await wait_routed(http, g.url, ECHO_TYPE, 1)
    await wait_routed(http, g.url, "authen", 2)

    async def opened() -> list[dict[str, Any]]:
        await call("POST", g.url + f"/{ECHO_TYPE}/x?status=500", headers=token)
        return actions(read_lines(g.log_path), "breaker-open")

    await wait_until(opened, timeout=30, message="the echo upstream's breaker opening")

    async def closed() -> list[dict[str, Any]]:
        await call("POST", g.url + f"/{ECHO_TYPE}/x?status=200", headers=token)
        return actions(read_lines(g.log_path), "breaker-closed")

    await wait_until(closed, timeout=30, message="the breaker closing again")

    async def alerted() -> list[dict[str, Any]]:
        for _ in range(8):
            await call("GET", g.url + "/authen/utilities/status")
        return actions(read_lines(g.log_path), "load-alert")

    await wait_until(alerted, timeout=30, message="a load alert")
    return read_lines(g.log_path)


async def test_real_log_lines_fit_the_template(stack: StackProcess, http: Any, admin_token: str) -> None:
    gw = stack.url("gateway")
    admin = admin_token
    # Sign-ups, sign-ins, chats with messages over sockets, then a deletion in each mode.
    two_pc, saga = await make_party(stack, chats=1, messages=2), await make_party(stack, chats=1, messages=2)
    assert (await delete(stack, admin, two_pc.user.id, "2pc")).code == 200
    assert (await delete(stack, admin, saga.user.id, "saga")).code in (200, 202)
    # Errors through the gateway: unknown path, no token, a bad body.
    assert (await call("GET", gw + f"/authen/no-such-{uuid.uuid4().hex[:6]}", token=admin)).code == 404
    assert (await call("GET", gw + "/chat/chats/list/my")).code == 401
    assert (await call("POST", gw + "/authen/authen/signup", {"username": 3})).code == 400

    async with (
        echo_upstream(stack),
        await start_gateway(
            stack,
            gateway_services=f"authen,chat,{ECHO_TYPE}",
            load_threshold_per_s_per_service=3,
            breaker_failures=2,
            breaker_min_requests=2,
            breaker_open_ms=100,
            breaker_open_max_ms=200,
            breaker_half_open_trials=1,
            breaker_min_clients=1,
        ) as g,
    ):
        own = await breaker_and_load_traffic(stack, g, http)

    logs = stack.layout.logs_dir

    def gateway_finished() -> list[dict[str, Any]]:
        return [
            e
            for e in actions(read_lines(logs / "gateway.log"), "deletion-finish")
            if get_field(e, "user.id") in (saga.user.id, str(saga.user.id))
            or get_field(e, "barber.transaction.mode") == "2pc"
        ]

    await wait_until(lambda: len(gateway_finished()) >= 2, timeout=60, message="both deletions logged as finished")

    by_file = {
        p.name: read_lines(p)
        for spec in SERVICES
        for p in [logs / f"{name}.log" for name in spec.instance_names(len(stack.layout.ports(spec.port_key)))]
    }
    by_file["extra-gateway"] = own
    found = [p for name, events in by_file.items() for p in problems_in(events, name)]
    # And the services other tests started before this one (crash tests' coordinators with
    # their recovery lines, for one), when the whole suite runs.
    for path in sorted(logs.glob("test-*.log")):
        ecs = [e for e in read_lines(path, strict=False) if "ecs.version" in e]
        found += problems_in(ecs, path.name)
    assert found == [], "\n".join(found[:40])

    everything = [e for events in by_file.values() for e in events]
    assert len(everything) > 100
    # Every line has its own id (Filebeat's document id) and names its service.
    assert all(get_field(e, "event.id") for e in everything)
    assert len({get_field(e, "event.id") for e in everything}) == len(everything)
    assert {get_field(e, "service.name") for e in everything} == {s.name for s in SERVICES}
    # The fields the dashboards use really occur, with values.
    seen = {path for e in everything for path, v in t._leaves(e) if v is not None}
    for name in (
        "http.response.status_code",
        "event.duration",
        "client.ip",
        "url.path",
        "http.request.id",
        "barber.route",
        "barber.upstream.service",
        "barber.upstream.instance",
        "barber.breaker.state",
        "barber.load.threshold_per_s",
        "barber.transaction.id",
        "barber.transaction.state",
        "barber.transaction.mode",
        "barber.chat.id",
        "user.id",
    ):
        assert name in seen, name

    # Alerts and transitions: selectable by event.kind/event.action, at the right level.
    (opened, *_), (closed, *_), (load, *_) = (actions(own, a) for a in ("breaker-open", "breaker-closed", "load-alert"))
    assert (get_field(opened, "event.kind"), opened["log.level"]) == ("alert", "warning")
    assert get_field(opened, "barber.breaker.state") == "open"
    assert (get_field(closed, "event.kind"), closed["log.level"]) == ("event", "info")
    assert (get_field(load, "event.kind"), load["log.level"]) == ("alert", "warning")
    assert (
        get_field(load, "barber.upstream.service") == "authen" and get_field(load, "barber.load.threshold_per_s") == 3
    )
    assert actions(own, "breaker-half-open")
    routed = [e for e in read_lines(logs / "gateway.log") if get_field(e, "barber.route") == "/authen/authen"]
    assert routed and all(get_field(e, "barber.upstream.service") == "authen" for e in routed)
    gateway_503 = [e for e in own if get_field(e, "http.response.status_code") == 503]
    assert gateway_503 and all(e["log.level"] == "error" for e in gateway_503)


@pytest.mark.unit
@pytest.mark.parametrize("action,kind", [("presumed-abort", "alert"), ("recovery-resume", "event")])
def test_recovery_fields_fit_the_template(action: str, kind: str) -> None:
    """Recovery lines appear only after a crash (tests/test_coordinator.py causes those);
    the fields they carry are checked here against the template."""
    fields = {
        **tx_fields(uuid.uuid4(), "2pc", "aborting", action, decision="abort", participant="authen"),
        "event.kind": kind,
        "user.id": 12,
    }
    event = {"@timestamp": "2026-01-01T00:00:00.000Z", "log.level": "warning", "message": "m", **fields}
    assert t.mapping_problems(event) == []
    assert t.mapping_problems({**event, "barber.transaction.user": 1}) == ["barber.transaction.user: not mapped"]


@pytest.mark.unit
def test_failed_etl_run_fields_fit_the_template() -> None:
    """A failed run's line (tests/test_etl_faults.py causes those) carries these fields."""
    from etl.pipeline import Run, run_fields

    run = Run(conn=None, run_id=4, full_refresh=True)  # type: ignore[arg-type]
    run.rows["extracted"] = 12
    fields = run_fields(run, "failed", 1.5, **{"error.type": "SourceUnavailable"})
    event = {"@timestamp": "2026-01-01T00:00:00.000Z", "log.level": "error", "message": "m", **fields}
    assert t.mapping_problems(event) == []
    assert fields["barber.etl.mode"] == "full" and fields["event.duration"] == 1_500_000_000
    assert fields["barber.etl.rows.extracted"] == 12
