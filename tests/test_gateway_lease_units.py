"""The limiter's leases and the proxy's candidate/breaker routine without a stack: which admissions stay local, what goes back to
Redis and when. Redis is replaced by a narrow fake of the one call the limiter makes (the
admission script's protocol, gateway.limiter.ADMIT_LUA), counting like the script does."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from common.discovery import Instance
from common.errors import ServiceUnavailable
from gateway import limiter as limiter_module
from gateway.breaker import BreakerConfig, CircuitBreaker, State
from gateway.limiter import Full, Limiter
from gateway.metrics import GatewayMetrics
from gateway.pool import ConnectFailed, UpstreamPool
from gateway.proxy import Proxy
from gateway.settings import GatewaySettings
from gateway.upstreams import Breakers, Service
from tests.util import free_port

# The "unit" marker is registered in pyproject by the test-infrastructure change.
pytestmark = pytest.mark.unit


class FakeScript:
    """The admission script over one dict of slots per (instance, gateway): same answers
    as ADMIT_LUA for round robin without rate limits."""

    def __init__(self) -> None:
        self.slots: dict[str, dict[str, int]] = {}
        self.calls: list[list[Any]] = []
        self.load: dict[str, int] = {}

    async def __call__(self, keys: list[str], args: list[Any]) -> list[Any]:
        self.calls.append(args)
        gw, threshold, block = args[1], int(args[3]), int(args[4])
        i = 5
        for _ in range(int(args[i])):
            self.slots.setdefault(args[i + 1], {})[gw] = int(args[i + 2])
            i += 2
        i += 1
        alerts: list[Any] = []

        def count(inst: str, n: int) -> int:
            before = self.load.get(inst, 0)
            self.load[inst] = before + n
            if before <= threshold < before + n:
                alerts.extend([inst, before + n])
            return before + n

        for _ in range(int(args[i])):
            count(args[i + 1], int(args[i + 2]))
            i += 2
        i += 1
        out: list[Any] = []
        lease: dict[str, int] = {}
        for _ in range(int(args[i])):
            limit, n_cand = int(args[i + 2]), int(args[i + 6])
            cands = args[i + 7 : i + 7 + n_cand]
            i += 7 + n_cand
            chosen = next((c for c in cands if sum(self.slots.get(c, {}).values()) < limit), None)
            if chosen is None:
                out.append([2, b"", 0])
                continue
            mine = self.slots.setdefault(chosen, {})
            mine[gw] = mine.get(gw, 0) + 1
            lease[chosen] = limit
            out.append([1, chosen.encode(), count(chosen, 1)])
        spares: list[Any] = []
        for inst, limit in lease.items():
            spare = min(block, (limit - sum(self.slots[inst].values())) // 4)
            if spare > 0:
                self.slots[inst][gw] += spare
                spares += [inst.encode(), spare]
        return [out, spares, alerts]


class FakeRedis:
    def __init__(self, script: FakeScript) -> None:
        self.script = script

    def register_script(self, _source: str) -> FakeScript:
        return self.script


def make(script: FakeScript, **kw: Any) -> Limiter:
    return Limiter(FakeRedis(script), owner_ttl_ms=3000, timeout_s=1, **kw)  # type: ignore[arg-type]


async def test_a_lease_admits_locally_until_its_spares_are_used() -> None:
    script = FakeScript()
    lim = make(script, lease_block=4)
    first = await lim.admit(["a", "b"], limit=64)
    assert first.instance == "a" and first.shared and lim.round_trips == 1
    assert lim.held["a"] == 5 and script.slots["a"][lim.gateway_id] == 5
    for _ in range(4):
        assert (await lim.admit(["a", "b"], limit=64)).instance == "a"
    assert lim.round_trips == 1 and lim.in_flight["a"] == 5
    # Spares used up: the next admission asks Redis again (and leases again).
    await lim.admit(["a", "b"], limit=64)
    assert lim.round_trips == 2 and lim.held["a"] == 10


async def test_near_the_limit_leases_are_exact_and_releases_go_back() -> None:
    script = FakeScript()
    lim = make(script)
    assert (await lim.admit(["a"], limit=3)).instance == "a"
    assert lim.held["a"] == 1  # (3 - 1) // 4 == 0 spares
    other = make(script)
    await other.admit(["a"], limit=3)
    await other.admit(["a"], limit=3)
    with pytest.raises(Full):
        await lim.admit(["a"], limit=3)
    lim.release("a")
    await lim.flush()
    assert script.slots["a"].get(lim.gateway_id, 0) == 0 and "a" not in lim.held
    assert (await lim.admit(["a"], limit=4)).instance == "a"


async def test_released_spares_stay_while_used_and_all_go_back_on_flush() -> None:
    script = FakeScript()
    lim = make(script, lease_block=8)
    admitted = [await lim.admit(["a"], limit=64) for _ in range(3)]
    assert lim.round_trips == 1 and lim.held["a"] == 9
    for a in admitted:
        lim.release(a.instance)
    assert lim.held["a"] == 8  # the last lease's spares are kept, the one over them goes back
    await lim.admit(["a"], limit=64)
    assert lim.round_trips == 1
    await lim.flush()  # spares go back; the slot in flight stays held
    assert lim.held == {"a": 1} and script.slots["a"][lim.gateway_id] == 1


async def test_idle_spares_are_given_back(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(limiter_module, "LEASE_IDLE_S", 0.0)
    script = FakeScript()
    lim = make(script)
    lim.release((await lim.admit(["a"], limit=64)).instance)
    lim._trim(everything=False)
    assert "a" not in lim.held and "a" in lim._dirty


async def test_load_of_leased_admissions_reaches_the_alert_once() -> None:
    script = FakeScript()
    seen: list[tuple[str, int, bool]] = []
    lim = make(script, load_threshold=3, on_load_alert=lambda i, n, shared: seen.append((i, n, shared)))
    for _ in range(6):
        await lim.admit(["a"], limit=64)
    assert lim.round_trips == 1 and not seen  # five of six admitted locally, not yet counted
    await lim.flush()
    assert seen == [("a", 6, True)] and script.load["a"] == 6
    for _ in range(3):
        await lim.admit(["a"], limit=64)
    await lim.flush()
    assert len(seen) == 1  # once


async def test_local_scope_alerts_on_its_own_counts() -> None:
    seen: list[tuple[str, int, bool]] = []
    lim = Limiter(
        None,
        owner_ttl_ms=3000,
        timeout_s=1,
        load_threshold=2,
        on_load_alert=lambda i, n, shared: seen.append((i, n, shared)),
    )
    for _ in range(4):
        await lim.admit(["a", "b"], limit=64)
    assert seen == [("a", 3, False)]


def test_breaker_half_open_trials_are_bounded_and_given_back() -> None:
    now = [0.0]
    b = CircuitBreaker(
        "x", BreakerConfig(failures=1, min_clients=1, open_s=1, jitter=0, half_open_trials=2), clock=lambda: now[0]
    )
    b.record_failure()
    assert b.current() is State.OPEN and not b.try_acquire()
    now[0] = 1.5
    assert b.try_acquire() and b.try_acquire() and not b.try_acquire()
    b.release_unused(State.HALF_OPEN)
    assert b.try_acquire()
    b.record_success(State.HALF_OPEN)
    b.record_success(State.HALF_OPEN)
    assert b.current() is State.CLOSED


class FakeView:
    """The one attribute of common.discovery.InstanceView the balancer reads."""

    def __init__(self, *ports: int) -> None:
        self.instances = tuple(Instance(f"i{p}", "authen", "127.0.0.1", p) for p in ports)


def test_requests_and_sockets_share_the_candidate_and_breaker_routine() -> None:
    breakers = Breakers(BreakerConfig(failures=2, min_clients=2, open_s=60), lambda *_: None)
    service = Service("authen", FakeView(1, 2), breakers)  # type: ignore[arg-type]
    proxy = Proxy(
        GatewaySettings(), {"authen": service}, Limiter(None, owner_ttl_ms=3000, timeout_s=1), GatewayMetrics(), None
    )  # type: ignore[arg-type]
    first = proxy.candidates(service, set())
    assert first is not None and [c.instance.port for c in first] == [1, 2]
    # Failures a client may have caused need two clients to trip the breaker.
    for client in ("ip:a", "ip:a", "ip:b"):
        proxy.record(service, first[0], ok=False, client=client)
    assert breakers.get("127.0.0.1:1").current() is State.OPEN
    assert [c.instance.port for c in proxy.candidates(service, set()) or []] == [2]
    assert proxy.pick_for_socket(service, set()).instance.port == 2
    # Nothing left: 503 for a first attempt, "give the last answer" after one.
    assert proxy.candidates(service, {"127.0.0.1:2"}, have_answer=True) is None
    with pytest.raises(ServiceUnavailable, match="circuit is open for all 2"):
        proxy.candidates(service, {"127.0.0.1:2"})


async def test_upstream_pool_reuses_bounded_connections_and_reads_each_framing() -> None:
    """The proxy's client against a real (tiny) HTTP/1.1 server of the test's own."""
    connections = 0

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal connections
        connections += 1
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                if b"/chunked" in head:
                    writer.write(
                        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nhel\r\n2\r\nlo\r\n0\r\n\r\n"
                    )
                elif b"/close" in head:
                    writer.write(b"HTTP/1.1 404 Not Found\r\nConnection: close\r\n\r\ngone")
                    writer.close()
                    return
                else:
                    writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nX-A: b\r\n\r\nhello")
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    address = f"127.0.0.1:{server.sockets[0].getsockname()[1]}"
    pool = UpstreamPool(connect_timeout_s=1, max_per_address=2, idle_s=5)
    try:
        answers = await asyncio.gather(*(pool.request(address, "GET", "/x", [], None) for _ in range(10)))
        assert {(a[0], a[3]) for a in answers} == {(200, b"hello")} and connections == 2
        assert ("X-A", "b") in answers[0][2]
        assert (await pool.request(address, "GET", "/chunked", [], None))[3] == b"hello"
        assert (await pool.request(address, "HEAD", "/x", [], None))[3] == b""
        status, reason, _, body = await pool.request(address, "GET", "/close", [], None)
        assert (status, reason, body) == (404, "Not Found", b"gone")
        assert (await pool.request(address, "GET", "/x", [], None))[3] == b"hello"  # a fresh connection
        with pytest.raises(ConnectFailed, match="cannot connect"):
            await pool.request(f"127.0.0.1:{free_port()}", "GET", "/", [], None)
    finally:
        await pool.close()
        server.close()
