"""The gateway's lean front (gateway/front.py) on real connections: what it serves
itself, what it hands over to Tornado and when, and the edges of its own connection
handling (pipelining, split heads and bodies, half-closed clients, slow readers, the
header timeout, Connection: close)."""

from __future__ import annotations

import asyncio
import json
import socket

from tests.test_gateway_support import (
    ECHO_TYPE,
    Raw,
    echo_upstream,
    request,
    start_gateway,
    token_for,
    wait_routed,
)
from tests.util import wait_until

WITH_ECHO = f"authen,chat,{ECHO_TYPE}"


def _auth(stack) -> str:
    return f"Authorization: Bearer {token_for(stack)}"


async def test_one_connection_moves_to_tornado_between_requests(stack) -> None:
    """A keep-alive connection served by the front (a proxied request) is handed to
    Tornado for /status, with nothing lost between them, and stays served."""
    conn = await Raw.open(stack.url("gateway"))
    try:
        for target in ("/authen/utilities/status", "/status", "/authen/utilities/status", "/status"):
            await conn.send(request("GET", target, "X-Request-ID: front-test-1"))
            status, headers, body = await conn.response()
            assert status == 200, (target, body)
            assert headers.get("x-request-id") == "front-test-1", (target, headers)
            assert json.loads(body)["service"] == ("gateway" if target == "/status" else "authen"), (target, body)
    finally:
        conn.close()


async def test_pipelined_requests_are_answered_in_order(stack, http) -> None:
    async with echo_upstream(stack), await start_gateway(stack, gateway_services=WITH_ECHO) as g:
        await wait_routed(http, g.url, ECHO_TYPE, 1)
        conn = await Raw.open(g.url)
        try:
            burst = b"".join(
                request("POST", f"/{ECHO_TYPE}/p?n={n}", _auth(stack), "Content-Length: 1", body=str(n).encode())
                for n in range(5)
            )
            # Then one the front hands over, pipelined behind them.
            await conn.send(burst + request("GET", "/status"))
            for n in range(5):
                status, _, body = await conn.response()
                seen = json.loads(body)
                assert status == 200 and seen["query"] == f"n={n}" and seen["body"] == str(n), (n, body)
            status, _, body = await conn.response()
            assert status == 200 and json.loads(body)["service"] == "gateway", body
        finally:
            conn.close()


async def test_heads_and_bodies_split_anywhere_are_served(stack, http) -> None:
    async with echo_upstream(stack), await start_gateway(stack, gateway_services=WITH_ECHO) as g:
        await wait_routed(http, g.url, ECHO_TYPE, 1)
        payload = b'{"split": "' + b"x" * 300 + b'"}'
        whole = request("PUT", f"/{ECHO_TYPE}/split", _auth(stack), f"Content-Length: {len(payload)}", body=payload)
        conn = await Raw.open(g.url)
        try:
            for cut in (5, len(whole) - len(payload) - 1, len(whole) - 3):
                await conn.send(whole[:cut])
                # Paced, so that the server sees two reads (not for synchronisation).
                await asyncio.sleep(0.05)
                await conn.send(whole[cut:])
                status, _, body = await conn.response()
                assert status == 200 and json.loads(body)["body"] == payload.decode(), (cut, body)
        finally:
            conn.close()


async def test_a_client_that_half_closes_still_gets_its_answer(stack) -> None:
    conn = await Raw.open(stack.url("gateway"))
    try:
        await conn.send(request("GET", "/authen/utilities/status"))
        conn.writer.write_eof()
        status, _, body = await conn.response()
        assert status == 200, body
        assert await conn.reader.read() == b""  # then the server closes
    finally:
        conn.close()


async def test_connection_close_is_honoured(stack) -> None:
    conn = await Raw.open(stack.url("gateway"))
    try:
        await conn.send(request("GET", "/authen/utilities/status", "Connection: close"))
        status, headers, _ = await conn.response()
        assert status == 200 and headers.get("connection") == "close", headers
        assert await conn.reader.read() == b""
    finally:
        conn.close()


async def test_head_answers_carry_the_length_but_no_body(stack) -> None:
    conn = await Raw.open(stack.url("gateway"))
    try:
        await conn.send(request("HEAD", "/authen/utilities/status"))
        head = await asyncio.wait_for(conn.reader.readuntil(b"\r\n\r\n"), 20)
        # authen answers HEAD with a 405 whose GET would carry a body: its length comes
        # through, the body does not.
        assert head.startswith(b"HTTP/1.1 405"), head
        assert b"\r\ncontent-length: 32\r\n" in head.lower(), head
        # The connection is still in step: the next answer is the next request's.
        await conn.send(request("GET", "/authen/no-such-route"))
        status, _, body = await conn.response()
        assert status == 401 and "detail" in json.loads(body), body
    finally:
        conn.close()


async def test_a_large_answer_to_a_slow_reader_arrives_whole(stack, http) -> None:
    """An answer larger than the socket takes at once is written as the client reads it,
    and the connection is then reused."""
    size = 3 * 1024 * 1024
    async with (
        echo_upstream(stack),
        await start_gateway(stack, gateway_services=WITH_ECHO, max_body_bytes=4 * size) as g,
    ):
        await wait_routed(http, g.url, ECHO_TYPE, 1)
        host, port = g.url.removeprefix("http://").split(":")
        sock = socket.socket()
        # A small window: the gateway's sends fill up and must wait for the reader.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.setblocking(False)
        await asyncio.get_running_loop().sock_connect(sock, (host, int(port)))
        conn = Raw(*await asyncio.open_connection(sock=sock, limit=64 * 1024))
        try:
            payload = b"y" * size
            await conn.send(request("POST", f"/{ECHO_TYPE}/big", _auth(stack), f"Content-Length: {size}", body=payload))
            status, _, body = await conn.response(timeout=60)
            assert status == 200 and json.loads(body)["body"] == payload.decode(), len(body)
            await conn.send(request("GET", f"/{ECHO_TYPE}/again", _auth(stack)))
            status, _, body = await conn.response()
            assert status == 200 and json.loads(body)["path"] == "/again", body
        finally:
            conn.close()


async def test_an_idle_connection_is_closed_after_the_header_timeout(stack) -> None:
    async with await start_gateway(stack, header_timeout_s=1) as g:
        conn = await Raw.open(g.url)
        try:
            await conn.send(request("GET", "/authen/utilities/status"))
            assert (await conn.response())[0] == 200
            await wait_until(conn.closed_by_peer, timeout=15, message="the idle connection closed")
        finally:
            conn.close()


async def test_requests_the_front_does_not_take_are_served_by_tornado(stack) -> None:
    """HTTP/1.0, a length over the limit, a malformed head: each gets Tornado's answer."""
    gw = stack.url("gateway")
    conn = await Raw.open(gw)
    try:
        await conn.send(b"GET /authen/utilities/status HTTP/1.0\r\nHost: gw.test\r\n\r\n")
        status, _, body = await conn.response()
        assert status == 200, body
    finally:
        conn.close()
    conn = await Raw.open(gw)
    try:
        await conn.send(request("POST", "/authen/authen/signin", "Content-Length: 99999999"))
        status, headers, body = await conn.response()
        assert status == 413 and "larger than" in json.loads(body)["detail"], body
        assert headers.get("x-request-id")
    finally:
        conn.close()
    conn = await Raw.open(gw)
    try:
        await conn.send(b"GET /authen/utilities/status HTTP/1.1\r\nHost: gw.test\r\nBad Header: x\r\n\r\n")
        status, _, _ = await conn.response()
        assert status == 400
    finally:
        conn.close()
