"""Issue 10, gateway side: each test makes an attack against real processes and checks
that it is refused (path spellings, header variants, breakers opened by one client,
slow or huge requests, connection floods, dead sockets, unthrottled sign-up)."""

from __future__ import annotations

import asyncio
import json
import struct
import time
from typing import Any

import aiohttp
import pytest

from common.config import chat_frame_bytes
from gateway.settings import GatewaySettings
from tests.test_gateway_support import (
    ECHO_TYPE,
    Raw,
    echo_upstream,
    fetch,
    gateway_instances,
    log_events,
    request,
    start_gateway,
    token_for,
    wait_routed,
)
from tests.util import wait_until

WITH_ECHO = f"authen,chat,{ECHO_TYPE}"


@pytest.fixture
def gw(stack) -> str:
    return stack.url("gateway")


# -- 1. paths: encoded control characters, '?', '#', spellings of a rate-limited path -------
@pytest.mark.parametrize(
    "target",
    [
        "/authen/%09internal/tx",
        "/authen/%0Ainternal/tx",
        "/authen/%0dinternal/tx",
        "/authen/%00internal/tx",
        "/authen/utilities/status%0A",
        "/authen/utilities%3Fx/status",
        "/authen/utilities%23/status",
        "/authen/%7Finternal/tx",
    ],
)
async def test_encoded_control_characters_and_delimiters_are_a_400(gw, target: str) -> None:
    """Seen: ``OPTIONS /authen/%09internal/tx`` reached authen's /internal/tx (the URL
    library dropped the tab after the check had passed)."""
    for method in ("OPTIONS", "GET", "POST"):
        r = await _raw_fetch(gw, method, target)
        assert r[0] == 400, (method, target, r)
        assert "detail" in json.loads(r[2]), r


async def _raw_fetch(base: str, method: str, target: str, *headers: str, body: bytes = b"") -> tuple[int, dict, bytes]:
    conn = await Raw.open(base)
    try:
        extra = (f"Content-Length: {len(body)}",) if method in ("POST", "PUT") else ()
        await conn.send(request(method, target, "Connection: close", *extra, *headers, body=body))
        return await conn.response()
    finally:
        conn.close()


async def test_the_checked_path_is_the_forwarded_path(stack, http) -> None:
    """Percent-encoded characters reach the instance encoded, unreserved ones in their
    plain (canonical) form: what the instance routes on is what the gateway checked."""
    async with echo_upstream(stack), await start_gateway(stack, gateway_services=WITH_ECHO) as g:
        await wait_routed(http, g.url, ECHO_TYPE, 1)
        auth = (f"Authorization: Bearer {token_for(stack)}",)
        for sent, arrived in [
            ("/a%20b/%c3%a9", "/a%20b/%C3%A9"),
            ("/%61bc/x%2Dy", "/abc/x-y"),
            ("/a/b;c=d/@e", "/a/b;c=d/@e"),
        ]:
            status, _, body = await _raw_fetch(g.url, "GET", f"/{ECHO_TYPE}{sent}?q=%0A", *auth)
            assert status == 200, (sent, body)
            seen = json.loads(body)
            assert seen["path"] == arrived and seen["query"] == "q=%0A", (sent, seen)
        # Raw bytes a client must have percent-encoded, and broken escapes, are refused
        # (raw control characters already by the HTTP parser, with its bare 400).
        for target in ("/a%zzb", "/a%4", '/a"b', "/caf\xe9", "/a{b}", "/a\tb", "/a\x7fb"):
            status, _, body = await _raw_fetch(g.url, "GET", f"/{ECHO_TYPE}{target}", *auth)
            assert status == 400, (target, status, body)
            assert target in ("/a\tb", "/a\x7fb") or "detail" in json.loads(body), (target, body)


async def test_signin_spellings_all_count_against_the_signin_rule(stack, http) -> None:
    """Seen: ``POST /authen/authen/signin%0A`` was routed to sign-in and matched no rule."""
    rules = json.dumps([{"path": "/authen/authen/signin", "methods": ["POST"], "rate_per_s": 0.01, "burst": 3}])
    async with await start_gateway(stack, rate_limits=rules) as g:
        await wait_routed(http, g.url, "authen", 2)
        bad = json.dumps({"username": "nobody_hardgw", "password": "wrong password"}).encode()
        ctype = "Content-Type: application/json"
        status, _, _ = await _raw_fetch(g.url, "POST", "/authen/authen/signin%0A", ctype, body=bad)
        assert status == 400
        statuses = [
            (await _raw_fetch(g.url, "POST", target, ctype, body=bad))[0]
            for target in (
                "/authen/authen/signin",
                "/authen/authen/signi%6E",
                "/authen/authen/%73ignin",
                "/authen/authen/signin",
            )
        ]
        assert statuses == [401, 401, 401, 429], statuses


# -- 5. header variants of X-User; a Content-Length that only looks like digits ------------
async def test_identity_header_variants_are_all_stripped(stack, http) -> None:
    async with echo_upstream(stack), await start_gateway(stack, gateway_services=WITH_ECHO) as g:
        await wait_routed(http, g.url, ECHO_TYPE, 1)
        spoofed = (
            "X_User: 1",
            "x-user: 2",
            "X-USER: 3",
            "X_USER_TYPE: admin",
            "x_user-type: admin",
            "X-User_Type: admin",
            "X_Service_Token: guess",
            "X_Request_ID: spoof",
            "X_Forwarded_For: 6.6.6.6",
        )
        status, _, body = await _raw_fetch(
            g.url, "GET", f"/{ECHO_TYPE}/x", f"Authorization: Bearer {token_for(stack, user_id=42)}", *spoofed
        )
        assert status == 200, body
        names = [(k.lower().replace("_", "-"), v) for k, v in json.loads(body)["headers"]]
        assert [v for k, v in names if k == "x-user"] == ["42"], names
        assert [v for k, v in names if k == "x-user-type"] == ["customer"], names
        assert [v for k, v in names if k == "x-forwarded-for"] == ["127.0.0.1"], names
        assert not [k for k, _ in names if k == "x-service-token"], names
        assert "spoof" not in [v for k, v in names if k == "x-request-id"], names


async def test_content_length_that_only_looks_numeric_is_a_clean_400(stack, http) -> None:
    """Seen: ``Content-Length: ²`` passed ``isdigit()``; ``int()`` then raised inside the
    server and the connection died with a traceback in the log."""
    async with await start_gateway(stack) as g:
        for value in ("\xb2", "\u0661\u0662", "1_0", "+5", "0x10"):
            try:
                raw = f"Content-Length: {value}".encode("latin-1")
            except UnicodeEncodeError:
                raw = f"Content-Length: {value}".encode()
            conn = await Raw.open(g.url)
            try:
                await conn.send(b"POST /authen/authen/signin HTTP/1.1\r\nHost: gw.test\r\n" + raw + b"\r\n\r\nabc")
                status, headers, body = await conn.response()
            finally:
                conn.close()
            assert status == 400 and "Content-Length" in json.loads(body)["detail"], (value, status, body)
            assert headers.get("x-request-id")
        assert not [e for e in log_events(g) if "Traceback" in json.dumps(e) or e.get("error")], log_events(g)[-3:]


# -- 2. breakers: one client's failing or slow requests open nothing -----------------------
async def test_one_client_cannot_open_a_breaker_but_many_failing_clients_do(stack, http) -> None:
    async with (
        echo_upstream(stack) as address,
        await start_gateway(
            stack,
            gateway_services=WITH_ECHO,
            breaker_failures=3,
            breaker_min_requests=5,
            timeout_ms=400,
            max_retries=0,
        ) as g,
    ):
        await wait_routed(http, g.url, ECHO_TYPE, 1)
        one = {"Authorization": f"Bearer {token_for(stack, user_id=501)}"}
        for _ in range(12):
            r = await fetch(http, "GET", g.url + f"/{ECHO_TYPE}/x?status=500", headers=one)
            assert r.status == 500, r
        for _ in range(4):
            r = await fetch(http, "GET", g.url + f"/{ECHO_TYPE}/x?delay=2", headers=one)
            assert r.status == 504, r
        breaker = (await gateway_instances(http, g.url, ECHO_TYPE))[address]["breaker"]
        assert breaker["state"] == "closed", breaker
        # Others are served meanwhile, and the instance is still counted as failing...
        other = {"Authorization": f"Bearer {token_for(stack, user_id=502)}"}
        assert (await fetch(http, "GET", g.url + f"/{ECHO_TYPE}/x", headers=other)).status == 200
        # ...so that failures from several clients in a row, an instance-wide fault, open it.
        for user in (601, 602, 603):
            headers = {"Authorization": f"Bearer {token_for(stack, user_id=user)}"}
            # 503 once it is open (the window's failure rate may trip it before the third).
            assert (await fetch(http, "GET", g.url + f"/{ECHO_TYPE}/x?status=500", headers=headers)).status in (
                500,
                503,
            )
        breaker = (await gateway_instances(http, g.url, ECHO_TYPE))[address]["breaker"]
        assert breaker["state"] == "open", breaker


async def test_sleepy_is_not_routed_unless_the_test_setting_is_on(stack, http) -> None:
    async with await start_gateway(stack, enable_sleepy=0) as g:
        await wait_routed(http, g.url, "authen", 2)
        for method in ("GET", "POST"):
            r = await fetch(http, method, g.url + "/authen/utilities/sleepy?seconds=0")
            assert r.status == 404 and "detail" in r.json, r
        assert (await fetch(http, "GET", g.url + "/authen/utilities/status")).status == 200
    assert GatewaySettings().enable_sleepy is False


# -- 4. slow or huge requests ---------------------------------------------------------------
async def _until_closed(conn: Raw, dribble: bytes | None, steps: int, pace_s: float) -> bool:
    """Dribble ``dribble`` (if any) ``steps`` times; True once the server closes on us."""
    for _ in range(steps):
        if await conn.closed_by_peer():
            return True
        if dribble is not None:
            try:
                await conn.send(dribble)
            except ConnectionError:
                return True
        await asyncio.sleep(pace_s)  # the attacker's pace, not a wait for a condition
    return await conn.closed_by_peer()


async def test_slowloris_headers_are_cut_off(stack, http) -> None:
    async with await start_gateway(stack, header_timeout_s=1) as g:
        conn = await Raw.open(g.url)
        try:
            await conn.send(b"GET /status HTTP/1.1\r\nHost: gw.test\r\n")
            # 100 header lines, one every 0.2 s: 20 s in all, each well within any idle limit.
            assert await _until_closed(conn, b"X-Slow: a\r\n", 100, 0.2), "the dribbling client was never cut off"
        finally:
            conn.close()
        assert (await fetch(http, "GET", g.url + "/status")).status == 200


async def test_a_stalled_body_is_cut_off(stack, http) -> None:
    async with await start_gateway(stack, body_timeout_s=1) as g:
        conn = await Raw.open(g.url)
        try:
            await conn.send(
                request(
                    "POST",
                    "/authen/authen/signin",
                    "Content-Length: 1000",
                    "Content-Type: application/json",
                    body=b'{"username": ',
                )
            )
            assert await _until_closed(conn, None, 100, 0.2), "the stalled body was never cut off"
        finally:
            conn.close()
        assert (await fetch(http, "GET", g.url + "/status")).status == 200


async def test_chunked_body_over_the_limit_is_a_413_before_it_ends(stack, http) -> None:
    """The answer comes while the body is still being sent: nothing waits for (or keeps)
    the 16 MiB the server would otherwise read."""
    async with await start_gateway(stack, max_body_bytes=4096) as g:
        conn = await Raw.open(g.url)
        try:
            await conn.send(
                request("POST", "/authen/authen/signin", "Transfer-Encoding: chunked", "Content-Type: application/json")
            )
            chunk = b"z" * 1024
            for _ in range(6):
                await conn.send(b"%x\r\n" % len(chunk) + chunk + b"\r\n")
            # The body is not finished (no last chunk): the 413 must not wait for it.
            status, headers, body = await conn.response(timeout=20)
        finally:
            conn.close()
        assert status == 413 and "larger than" in json.loads(body)["detail"], (status, body)
        assert headers.get("x-request-id")
        # Under the limit, chunked still works.
        r = await fetch(
            http,
            "POST",
            g.url + "/authen/authen/signin",
            data=_chunks(b'{"username": "x"}'),
            headers={"Content-Type": "application/json"},
        )
        assert r.status == 400 and "password" in r.json["detail"], r


async def _chunks(data: bytes):  # an async generator makes aiohttp send a chunked body
    yield data


async def test_connections_over_the_cap_are_refused_while_others_are_served(stack, http) -> None:
    async with await start_gateway(stack, max_connections=4) as g:
        idle = [await Raw.open(g.url) for _ in range(3)]
        try:
            async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=1)) as client:
                # The fourth connection (the client's, kept alive) is served. The health
                # check's connection may not have been reaped by the server yet (its close is
                # seen a moment later), so the first may be refused: wait for one served.
                async def fourth_served() -> bool:
                    return (await fetch(client, "GET", g.url + "/status")).status == 200

                await wait_until(fourth_served, timeout=15, message="a fourth connection served")
                # Then that connection is kept, and served again and again.
                for _ in range(5):
                    assert (await fetch(client, "GET", g.url + "/status")).status == 200
                # A fifth is refused at once with a JSON 503.
                extra = await Raw.open(g.url)
                try:
                    status, headers, body = await extra.response()
                finally:
                    extra.close()
                assert status == 503 and "connections" in json.loads(body)["detail"], (status, body)
                assert headers.get("retry-after")
                assert (await fetch(client, "GET", g.url + "/status")).status == 200
        finally:
            for conn in idle:
                conn.close()

        async def served() -> bool:
            async with aiohttp.ClientSession() as fresh:
                return (await fetch(fresh, "GET", g.url + "/status")).status == 200

        await wait_until(served, timeout=15, message="new connections accepted once the idle ones closed")


# -- 7. WebSockets: frame limit as chat's, pings on the client leg ---------------------------
async def test_socket_frame_limit_is_chats(stack, http) -> None:
    limit = chat_frame_bytes(GatewaySettings().chat_max_message_chars)
    async with echo_upstream(stack), await start_gateway(stack, gateway_services=WITH_ECHO) as g:
        await wait_routed(http, g.url, ECHO_TYPE, 1)
        url = g.url.replace("http://", "ws://") + f"/{ECHO_TYPE}/ws?token={token_for(stack)}"
        async with http.ws_connect(url, max_msg_size=0) as ws:
            await ws.receive(timeout=10)
            await ws.send_str("a" * limit)
            assert len((await ws.receive(timeout=10)).data) == limit
            await ws.send_str("a" * (limit + 1))
            msg = await ws.receive(timeout=10)
            assert msg.type == aiohttp.WSMsgType.CLOSE and msg.data == 1009, msg


async def _ws_frames(conn: Raw, deadline_s: float) -> list[int]:
    """Opcodes of the frames the server sends until it closes the connection (no pongs)."""
    opcodes: list[int] = []
    async with asyncio.timeout(deadline_s):
        while True:
            try:
                b0, b1 = await conn.reader.readexactly(2)
            except (asyncio.IncompleteReadError, ConnectionError):
                return opcodes
            length = b1 & 0x7F
            if length == 126:
                (length,) = struct.unpack("!H", await conn.reader.readexactly(2))
            elif length == 127:
                (length,) = struct.unpack("!Q", await conn.reader.readexactly(8))
            await conn.reader.readexactly(length)
            opcodes.append(b0 & 0x0F)


async def test_a_client_that_stops_answering_pings_is_closed(stack, http) -> None:
    async with (
        echo_upstream(stack),
        await start_gateway(stack, gateway_services=WITH_ECHO, ws_ping_interval_s=0.5, ws_ping_timeout_s=0.5) as g,
    ):
        await wait_routed(http, g.url, ECHO_TYPE, 1)
        conn = await Raw.open(g.url)
        try:
            await conn.send(
                request(
                    "GET",
                    f"/{ECHO_TYPE}/ws?token={token_for(stack)}",
                    "Upgrade: websocket",
                    "Connection: Upgrade",
                    "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==",
                    "Sec-WebSocket-Version: 13",
                )
            )
            status, _, _ = await _handshake(conn)
            assert status == 101

            async def open_sockets() -> float:
                text = (await fetch(http, "GET", g.url + "/metrics")).body.decode()
                return sum(
                    float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith("gateway_websockets")
                )

            assert await open_sockets() == 1
            # This client reads but never answers a ping.
            opcodes = await _ws_frames(conn, deadline_s=30)
        finally:
            conn.close()
        assert 0x9 in opcodes and opcodes[-1] == 0x8, opcodes  # pinged, then closed
        await wait_until(lambda: _is_zero(open_sockets), timeout=10, message="the dead socket reaped")


async def _is_zero(f: Any) -> bool:
    return await f() == 0


async def _handshake(conn: Raw) -> tuple[int, dict, bytes]:
    head = await asyncio.wait_for(conn.reader.readuntil(b"\r\n\r\n"), 20)
    return int(head.split(b" ")[1]), {}, b""


# -- 6. sign-up is rate-limited per client by default ---------------------------------------
async def test_signup_is_rate_limited_per_client_by_default(stack, http) -> None:
    rule = next(r for r in GatewaySettings().rate_limits if r.matches("POST", "/authen/authen/signup"))
    async with await start_gateway(stack) as g:
        await wait_routed(http, g.url, "authen", 2)
        # Invalid bodies: the gateway charges the bucket before the instance refuses them,
        # so this costs no password hashing.
        # The bucket refills while the requests run (slowly, on a loaded machine), so the
        # refusal must come within the burst plus what has refilled meanwhile, not at
        # exactly burst + 1.
        started = time.monotonic()
        statuses: list[int] = []
        while 429 not in statuses:
            statuses.append((await fetch(http, "POST", g.url + "/authen/authen/signup", body={})).status)
            refilled = rule.rate_per_s * (time.monotonic() - started)
            assert len(statuses) <= rule.burst + refilled + 1, statuses
        assert set(statuses) <= {400, 429}, statuses
        # Another client (a signed-in user) has its own bucket.
        other = {"Authorization": f"Bearer {token_for(stack, user_id=777)}"}
        assert (await fetch(http, "POST", g.url + "/authen/authen/signup", body={}, headers=other)).status == 400


# -- the same rules without servers -----------------------------------------------------------
@pytest.mark.unit
def test_breaker_counts_clients_not_failures() -> None:
    from gateway.breaker import BreakerConfig, CircuitBreaker, State

    b = CircuitBreaker("i", BreakerConfig(failures=3, min_requests=4, min_clients=3))
    for _ in range(50):
        b.record_failure(client="ip:1.2.3.4")
    assert b.current() is State.CLOSED  # one client, however many failures
    b.record_failure(client="u:1")
    assert b.current() is State.CLOSED
    b.record_failure(client="u:2")
    assert b.current() is State.OPEN  # three clients failing: the instance is at fault
    connect = CircuitBreaker("j", BreakerConfig(failures=3, min_requests=100, min_clients=3))
    for _ in range(3):
        connect.record_failure(client=None)  # connect failures: the instance's alone
    assert connect.current() is State.OPEN


@pytest.mark.parametrize(
    "raw, canonical",
    [
        ("utilities/status", "/utilities/status"),
        ("%61bc", "/abc"),
        ("a%2db", "/a-b"),
        ("x%c3%a9", "/x%C3%A9"),
        ("a%20b", "/a%20b"),
        ("a;b=c/@d", "/a;b=c/@d"),
    ],
)
@pytest.mark.unit
def test_canonical_paths(raw: str, canonical: str) -> None:
    from gateway.policy import check_service_path

    assert check_service_path(raw) == canonical


@pytest.mark.parametrize(
    "raw",
    [
        "%09internal/tx",
        "signin%0A",
        "a%0D",
        "a%00",
        "a%3Fb",
        "a%23b",
        "a%7F",
        "a%C2%85",
        "a%zz",
        "a%4",
        "a b",
        "a\tb",
        'a"b',
        "caf\xe9",
        "a%FF",
    ],
)
@pytest.mark.unit
def test_malformed_paths(raw: str) -> None:
    from gateway.policy import MalformedPath, check_service_path

    with pytest.raises(MalformedPath):
        check_service_path(raw)


@pytest.mark.unit
def test_identity_header_spellings_dropped() -> None:
    from gateway.policy import upstream_request_headers

    sent = [
        ("X_User", "1"),
        ("x-user", "2"),
        ("X-USER", "3"),
        (" X-User", "4"),
        ("X_USER_TYPE", "admin"),
        ("x_service_token", "t"),
        ("X_Forwarded_For", "6.6.6.6"),
        ("X-Other_Name", "kept"),
    ]
    out = upstream_request_headers(
        sent, request_id="r", client_ip="127.0.0.1", host=None, proto="http", user_id=5, user_type="customer"
    )
    assert [v for k, v in out if k.lower().replace("_", "-").strip() == "x-user"] == ["5"]
    assert [v for k, v in out if k.lower().replace("_", "-") == "x-user-type"] == ["customer"]
    assert ("X-Forwarded-For", "127.0.0.1") in out and ("X-Other_Name", "kept") in out
    assert not [k for k, _ in out if "service" in k.lower()]


@pytest.mark.unit
def test_rate_rules_default_signup_and_canonical_match() -> None:
    rules = GatewaySettings().rate_limits
    assert any(r.matches("POST", "/authen/authen/signup") for r in rules)
    assert any(r.matches("POST", "/authen/authen/signin/") for r in rules)
    assert not any(r.matches("GET", "/authen/authen/signup") for r in rules)


@pytest.mark.unit
def test_whole_string_patterns() -> None:
    from common.errors import BadRequest
    from common.logs import sane_request_id
    from common.participant import check_gid
    from discovery.registry import TYPE_RE

    with pytest.raises(BadRequest):
        check_gid("barber-tx-1\n")
    assert check_gid("barber-tx-1") == "barber-tx-1"
    assert TYPE_RE.fullmatch("authen") and not TYPE_RE.fullmatch("authen\n")
    assert sane_request_id("abc") == "abc" and sane_request_id("abc\n") != "abc\n"
