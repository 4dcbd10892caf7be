"""The proxy's own HTTP/1.1 client: keep-alive connections per upstream address.

aiohttp's client cost 10-19 % of the gateway's CPU per proxied request, most of it in
generality the proxy does not use (cookies, redirects, decompression, multidicts,
tracing). This client sends one request and reads one whole response on a pooled
connection, and tells the proxy whether a failure happened before the request could
reach the instance (:class:`ConnectFailed`: safe to send elsewhere, any method) or after
(:class:`UpstreamFailed`). A connection is reused only after a response it read to the
end, and it is closed when the request is cancelled (deadline), so no response is ever
read by the wrong request. Idle connections are closed after ``idle_s`` (half the
services' own idle timeout), so a request never goes out on one the server is closing.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Sequence
from typing import cast

MAX_HEAD_BYTES = 64 * 1024
_NO_BODY_STATUS = frozenset({204, 304})


class UpstreamFailed(Exception):
    """The request may have reached the instance (reset, closed early, bad answer)."""


class ConnectFailed(UpstreamFailed):
    """The request never reached the instance: it could not be connected to."""


class _Conn(asyncio.Protocol):
    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.buf = bytearray()
        self.eof = False
        self.idle_since = 0.0
        self._waiter: asyncio.Future[None] | None = None

    # -- asyncio.Protocol ------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses, but have its methods.
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        self.buf += data
        self._wake()

    def eof_received(self) -> bool:
        self.eof = True
        self._wake()
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self.eof = True
        self._wake()

    def _wake(self) -> None:
        w = self._waiter
        if w is not None and not w.done():
            w.set_result(None)

    # -- reading ---------------------------------------------------------------------
    @property
    def reusable(self) -> bool:
        """Open and silent: a connection with bytes nobody asked for is not trusted."""
        return not self.eof and not self.buf and self.transport is not None and not self.transport.is_closing()

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()

    async def _fill(self) -> None:
        if self.eof:
            raise UpstreamFailed("the instance closed the connection")
        self._waiter = asyncio.get_running_loop().create_future()
        try:
            await self._waiter
        finally:
            self._waiter = None

    async def _until(self, marker: bytes, limit: int) -> bytes:
        while (end := self.buf.find(marker)) < 0:
            if len(self.buf) > limit:
                raise UpstreamFailed("the instance's response head is too large")
            await self._fill()
        out = bytes(self.buf[:end])
        del self.buf[: end + len(marker)]
        return out

    async def _exactly(self, n: int) -> bytes:
        while len(self.buf) < n:
            await self._fill()
        out = bytes(self.buf[:n])
        del self.buf[:n]
        return out

    async def _to_eof(self) -> bytes:
        while not self.eof:
            await self._fill_or_eof()
        out = bytes(self.buf)
        self.buf.clear()
        return out

    async def _fill_or_eof(self) -> None:
        self._waiter = asyncio.get_running_loop().create_future()
        try:
            await self._waiter
        finally:
            self._waiter = None

    async def _chunked(self) -> bytes:
        parts: list[bytes] = []
        while True:
            line = await self._until(b"\r\n", MAX_HEAD_BYTES)
            try:
                size = int(line.split(b";", 1)[0].strip(), 16)
            except ValueError as e:
                raise UpstreamFailed("the instance sent a malformed chunk") from e
            if size == 0:
                # Trailers (dropped, as hop-by-hop metadata) up to the empty line.
                while await self._until(b"\r\n", MAX_HEAD_BYTES):
                    pass
                return b"".join(parts)
            parts.append(await self._exactly(size))
            await self._exactly(2)

    async def response(self, method: str) -> tuple[int, str, list[tuple[str, str]], bytes, bool]:
        """(status, reason, headers, body, keep-alive?) of the next response."""
        while True:
            head = (await self._until(b"\r\n\r\n", MAX_HEAD_BYTES)).decode("latin-1")
            status_line, _, rest = head.partition("\r\n")
            version, _, status_reason = status_line.partition(" ")
            code, _, reason = status_reason.partition(" ")
            try:
                status = int(code)
            except ValueError as e:
                raise UpstreamFailed("the instance sent a malformed status line") from e
            if not 100 <= status < 200:
                break  # interim responses (100 Continue) are skipped
        headers = [(k, v.strip()) for k, _, v in (line.partition(":") for line in rest.split("\r\n") if line)]
        keep_alive = version == "HTTP/1.1"
        length: int | None = None
        chunked = False
        for k, v in headers:
            name = k.lower()
            if name == "content-length":
                length = int(v) if v.isdigit() else None
            elif name == "transfer-encoding":
                chunked = "chunked" in v.lower()
            elif name == "connection":
                keep_alive = keep_alive and "close" not in v.lower()
        if method == "HEAD" or status in _NO_BODY_STATUS:
            body = b""
        elif chunked:
            body = await self._chunked()
        elif length is not None:
            body = await self._exactly(length)
        else:
            body, keep_alive = await self._to_eof(), False
        return status, reason, headers, body, keep_alive


class UpstreamPool:
    def __init__(self, *, connect_timeout_s: float, max_per_address: int, idle_s: float) -> None:
        self.connect_timeout_s = connect_timeout_s
        self.max_per_address = max_per_address
        self.idle_s = idle_s
        self._idle: dict[str, deque[_Conn]] = {}
        self._open: dict[str, int] = {}
        self._waiting: dict[str, deque[asyncio.Future[None]]] = {}
        self._sweeper: asyncio.TimerHandle | None = None
        self._closed = False

    async def request(
        self, address: str, method: str, path_qs: str, headers: Sequence[tuple[str, str]], body: bytes | None
    ) -> tuple[int, str, list[tuple[str, str]], bytes]:
        """One request on a pooled connection to ``address`` (``host:port``)."""
        conn = await self._acquire(address)
        done = False
        try:
            assert conn.transport is not None
            conn.transport.write(_request_bytes(address, method, path_qs, headers, body))
            status, reason, resp_headers, data, keep_alive = await conn.response(method)
            done = keep_alive
            return status, reason, resp_headers, data
        except OSError as e:
            raise UpstreamFailed(e.strerror or str(e) or type(e).__name__) from e
        finally:
            self._release(address, conn, reuse=done)

    async def close(self) -> None:
        self._closed = True
        if self._sweeper is not None:
            self._sweeper.cancel()
        for conns in self._idle.values():
            for c in conns:
                c.close()
        self._idle.clear()

    # -- connections -----------------------------------------------------------------
    async def _acquire(self, address: str) -> _Conn:
        conn = self._idle_conn(address)
        while conn is None and self._open.get(address, 0) >= self.max_per_address:
            # At UPSTREAM_MAX_CONNECTIONS: wait for one to come back or close.
            waiter = asyncio.get_running_loop().create_future()
            self._waiting.setdefault(address, deque()).append(waiter)
            await waiter
            conn = self._idle_conn(address)
        if conn is not None:
            return conn
        self._open[address] = self._open.get(address, 0) + 1
        try:
            return await self._connect(address)
        except BaseException:
            self._open[address] -= 1
            self._wake_one(address)
            raise

    def _idle_conn(self, address: str) -> _Conn | None:
        """The most recently used idle connection still fit for a request."""
        idle = self._idle.get(address)
        while idle:
            conn = idle.pop()
            if conn.reusable and time.monotonic() - conn.idle_since < self.idle_s:
                return conn
            self._forget(address, conn)
        return None

    async def _connect(self, address: str) -> _Conn:
        host, _, port = address.rpartition(":")
        loop = asyncio.get_running_loop()
        try:
            _, conn = await asyncio.wait_for(
                loop.create_connection(_Conn, host.strip("[]"), int(port)), self.connect_timeout_s
            )
        except TimeoutError as e:
            raise ConnectFailed("cannot connect (timed out)") from e
        except OSError as e:
            raise ConnectFailed(f"cannot connect ({e.strerror or e})") from e
        if self._sweeper is None and not self._closed:
            self._sweeper = loop.call_later(self.idle_s / 2, self._sweep)
        return conn

    def _release(self, address: str, conn: _Conn, *, reuse: bool) -> None:
        if reuse and conn.reusable and not self._closed:
            conn.idle_since = time.monotonic()
            self._idle.setdefault(address, deque()).append(conn)
            self._wake_one(address)
        else:
            self._forget(address, conn)

    def _forget(self, address: str, conn: _Conn) -> None:
        conn.close()
        self._open[address] = self._open.get(address, 1) - 1
        self._wake_one(address)

    def _wake_one(self, address: str) -> None:
        waiting = self._waiting.get(address)
        while waiting:
            w = waiting.popleft()
            if not w.done():
                w.set_result(None)
                return

    def _sweep(self) -> None:
        """Close connections idle for ``idle_s``, before the server closes them."""
        self._sweeper = None
        horizon = time.monotonic() - self.idle_s
        for address, conns in self._idle.items():
            while conns and (conns[0].idle_since < horizon or not conns[0].reusable):
                self._forget(address, conns.popleft())
        if any(self._idle.values()) and not self._closed:
            self._sweeper = asyncio.get_running_loop().call_later(self.idle_s / 2, self._sweep)


def _request_bytes(
    address: str, method: str, path_qs: str, headers: Sequence[tuple[str, str]], body: bytes | None
) -> bytes:
    # Header values arrive decoded as latin-1 (Tornado's parser), so latin-1 sends the
    # client's bytes unchanged; they cannot contain CR or LF.
    lines = [f"{method} {path_qs} HTTP/1.1\r\nHost: {address}\r\n"]
    lines += [f"{k}: {v}\r\n" for k, v in headers]
    if body is not None:
        lines.append(f"Content-Length: {len(body)}\r\n")
    lines.append("\r\n")
    head = "".join(lines).encode("latin-1")
    return head + body if body else head
