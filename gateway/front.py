"""The gateway's public HTTP/1.1 server: a lean front for proxied requests, Tornado for
everything else.

Tornado's HTTP/1 server machinery (its Python parser, IOStream, HTTP1Connection, the
routing delegates) was over half of the gateway's CPU per proxied request. The front
reads from the client's socket itself, parses each request head with httptools (the C
parser uvicorn uses), and answers a proxied request with one ``send`` of the whole
response. It takes only the plain requests a proxy sees all day:

- HTTP/1.1, one of the proxied methods, a target ``/<service>/...`` of printable ASCII,
- no ``Upgrade``, ``Expect`` or ``Transfer-Encoding``, at most one ``Content-Length``
  (plain digits, within ``MAX_BODY_BYTES``).

Anything else (``/status``, ``/metrics``, the coordinator, WebSocket upgrades, chunked
bodies, oversize or malformed lengths, HTTP/1.0, a head the parser refuses) hands the
connection over to Tornado's server, with the bytes read so far, between two requests:
Tornado then serves it for the rest of its life, with its handlers, body limits and
error answers, as if it had accepted it. So every behaviour that is not the hot path
stays where it was, and the front is only a faster way through for the common case.

Kept on the front's own connections: the header timeout (a request head, or the next one
on an idle keep-alive connection, within ``HEADER_TIMEOUT_S``), the body timeout,
``MAX_CONNECTIONS`` (counted over the front's and Tornado's connections together; past it
a connection gets the same JSON 503), one request at a time per connection (a pipelined
request waits for the answer before it), and the in-flight count a graceful stop waits
for (gateway.forwarding.answer).
"""

from __future__ import annotations

import asyncio
import logging
import re
import socket
import time
from collections.abc import Callable
from typing import Any

import httptools
from tornado.httputil import responses
from tornado.iostream import IOStream
from tornado.netutil import add_accept_handler, bind_sockets

from common.bodylimit import refuse_connection
from common.logs import request_id_var, sane_request_id
from common.service import Server
from gateway.context import GatewayContext
from gateway.forwarding import PROXIED_METHODS, Answer, Incoming, answer

log = logging.getLogger("barber.gateway")

# A head longer than this is Tornado's to refuse (its 431/400), as are heads that never end.
MAX_HEAD_BYTES = 64 * 1024
# While a request is answered, the next pipelined bytes are kept up to this, then reading
# pauses until the answer is out.
MAX_PENDING_BYTES = 256 * 1024
_READ_BYTES = 64 * 1024
# How often the header and body timeouts are checked: they may fire up to this late.
_SWEEP_S = 0.25
_TARGET = re.compile(rb"/[\x21-\x7e]*")
_LENGTH = re.compile(rb"[0-9]{1,19}")
# Headers that make a request one for Tornado (bodies without a length, 100-continue,
# protocol switches).
_HANDED_OVER = frozenset({b"upgrade", b"expect", b"transfer-encoding"})
_METHODS = frozenset(m.encode() for m in PROXIED_METHODS)


class Front:
    """The public listener. ``tornado`` is the service's Tornado server (not listening
    itself): connections the front does not serve are given to it."""

    def __init__(
        self,
        ctx: GatewayContext,
        app_settings: dict[str, Any],
        tornado: Server,
        *,
        max_body_bytes: int,
        header_timeout_s: float,
        body_timeout_s: float,
        max_connections: int,
    ) -> None:
        self.ctx = ctx
        self.app_settings = app_settings
        self.tornado = tornado
        self.max_body_bytes = max_body_bytes
        self.header_timeout_s = header_timeout_s
        self.body_timeout_s = body_timeout_s
        self.max_connections = max_connections
        self.services = {f"/{name}/".encode(): name for name in ctx.services}
        self.clients: set[_Client] = set()
        self.tasks: set[asyncio.Task[None]] = set()
        self._stop_accepting: list[Callable[[], None]] = []
        self._sockets: list[socket.socket] = []
        self._sweeper: asyncio.TimerHandle | None = None
        self.loop: asyncio.AbstractEventLoop | None = None

    # -- the server interface common.service.serve uses ------------------------------
    def listen(self, port: int, address: str | None = None) -> None:
        self.loop = asyncio.get_running_loop()
        for sock in bind_sockets(port, address=address):
            self._sockets.append(sock)
            self._stop_accepting.append(add_accept_handler(sock, self._accept))
        self._sweeper = self.loop.call_later(_SWEEP_S, self._sweep)

    def stop(self) -> None:
        """Stop accepting; connections already open are served on."""
        for remove in self._stop_accepting:
            remove()
        self._stop_accepting.clear()
        for sock in self._sockets:
            sock.close()
        self._sockets.clear()
        self.tornado.stop()

    async def close_all_connections(self) -> None:
        if self._sweeper is not None:
            self._sweeper.cancel()
        for client in list(self.clients):
            client.close()
        await self.tornado.close_all_connections()

    # -- connections -----------------------------------------------------------------
    def _accept(self, sock: socket.socket, address: Any) -> None:
        if len(self.clients) + self.tornado.connection_count >= self.max_connections:
            refuse_connection(self.tornado.limits, IOStream(sock), self.max_connections)
            return
        sock.setblocking(False)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.clients.add(_Client(self, sock, address))

    def hand_over(self, client: _Client) -> None:
        """Tornado serves ``client``'s connection from here on, from the bytes not yet
        answered."""
        self.clients.discard(client)
        stream = _Prefilled(
            client.sock,
            bytes(client.buf),
            max_buffer_size=self.tornado.max_buffer_size,
            read_chunk_size=self.tornado.read_chunk_size,
        )
        self.tornado.handle_stream(stream, client.address)

    def _sweep(self) -> None:
        """Close connections past their header or body deadline."""
        assert self.loop is not None
        now = time.monotonic()
        for client in [c for c in self.clients if c.deadline and c.deadline < now]:
            client.close()
        self._sweeper = self.loop.call_later(_SWEEP_S, self._sweep)


class _Prefilled(IOStream):
    """An IOStream that first reads the bytes the front had already read from its socket."""

    def __init__(self, sock: socket.socket, pending: bytes, **kwargs: Any) -> None:
        super().__init__(sock, **kwargs)
        self._pending = memoryview(pending)

    def read_from_fd(self, buf: bytearray | memoryview) -> int | None:
        if self._pending:
            n = min(len(buf), len(self._pending))
            buf[:n] = self._pending[:n]
            self._pending = self._pending[n:]
            return n
        return super().read_from_fd(buf)


class _Head:
    """httptools callbacks for one request head."""

    __slots__ = ("headers", "url")

    def __init__(self) -> None:
        self.url = b""
        self.headers: list[tuple[bytes, bytes]] = []

    def on_url(self, url: bytes) -> None:
        self.url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers.append((name, value))


class _Request:
    __slots__ = ("close", "incoming", "length", "service")

    def __init__(self, incoming: Incoming, service: str, length: int, close: bool) -> None:
        self.incoming = incoming
        self.service = service
        self.length = length
        self.close = close


class _Client:
    """One client connection the front serves."""

    __slots__ = (
        "address",
        "buf",
        "busy",
        "deadline",
        "eof",
        "fd",
        "front",
        "loop",
        "out",
        "paused",
        "pending",
        "sock",
    )

    def __init__(self, front: Front, sock: socket.socket, address: Any) -> None:
        assert front.loop is not None
        self.front = front
        self.loop = front.loop
        self.sock = sock
        self.fd = sock.fileno()
        self.address = address
        self.buf = bytearray()
        # A request is being answered (or its answer written): the next waits.
        self.busy = False
        self.eof = False
        # Reading stopped while a long pipeline waits.
        self.paused = False
        # The head of a request whose body is still arriving.
        self.pending: _Request | None = None
        self.out: memoryview | None = None
        self.deadline = time.monotonic() + front.header_timeout_s
        self.loop.add_reader(self.fd, self._readable)

    # -- reading ---------------------------------------------------------------------
    def _readable(self) -> None:
        try:
            data = self.sock.recv(_READ_BYTES)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            self.close()
            return
        if not data:
            # The client is done sending: answer what it asked, then close.
            self.eof = True
            self.loop.remove_reader(self.fd)
            if not self.busy:
                self.close()
            return
        self.buf += data
        if self.busy:
            if len(self.buf) > MAX_PENDING_BYTES:
                self.paused = True
                self.loop.remove_reader(self.fd)
            return
        self._next()

    def _next(self) -> None:
        """Start answering the next request in the buffer, once it is all there."""
        request = self.pending
        if request is None:
            end = self.buf.find(b"\r\n\r\n")
            if end < 0:
                if len(self.buf) > MAX_HEAD_BYTES:
                    self._hand_over()
                return
            request = self._parse(end + 4)
            if request is None:
                self._hand_over()
                return
            del self.buf[: end + 4]
            if len(self.buf) < request.length:
                self.pending = request
                self.deadline = time.monotonic() + self.front.body_timeout_s
                return
        elif len(self.buf) < request.length:
            return
        self.pending = None
        if request.length:
            request.incoming.body = bytes(self.buf[: request.length])
            del self.buf[: request.length]
        self.busy = True
        self.deadline = 0.0
        task = self.loop.create_task(self._serve(request))
        self.front.tasks.add(task)
        task.add_done_callback(self.front.tasks.discard)

    def _parse(self, head_end: int) -> _Request | None:
        """The request whose head ends at ``head_end``, if the front serves it."""
        head = _Head()
        parser = httptools.HttpRequestParser(head)
        try:
            parser.feed_data(bytes(self.buf[:head_end]))
        except (httptools.HttpParserError, httptools.HttpParserUpgrade):
            return None
        method = parser.get_method()
        if method not in _METHODS or parser.get_http_version() != "1.1" or not _TARGET.fullmatch(head.url):
            return None
        second = head.url.find(b"/", 1)
        service = self.front.services.get(head.url[: second + 1]) if second > 0 else None
        if service is None:
            return None
        length = 0
        seen_length = False
        close = False
        host = "127.0.0.1"
        headers: list[tuple[str, str]] = []
        for name, value in head.headers:
            lower = name.lower()
            if lower in _HANDED_OVER:
                return None
            if lower == b"content-length":
                if seen_length or not _LENGTH.fullmatch(value) or int(value) > self.front.max_body_bytes:
                    return None
                seen_length = True
                length = int(value)
            elif lower == b"connection":
                close = b"close" in value.lower()
            elif lower == b"host" and value:
                host = value.decode("latin-1")
            headers.append((name.decode("latin-1"), value.decode("latin-1")))
        url = head.url.decode("ascii")
        path, _, query = url.partition("?")
        incoming = Incoming(method.decode(), path, query, headers, self.address[0], host, "http", b"")
        return _Request(incoming, service, length, close)

    def _hand_over(self) -> None:
        self.loop.remove_reader(self.fd)
        self.front.hand_over(self)

    # -- answering -------------------------------------------------------------------
    async def _serve(self, request: _Request) -> None:
        started = time.perf_counter()
        incoming = request.incoming
        request_id = sane_request_id(incoming.header("x-request-id"))
        request_id_var.set(request_id)
        fields: dict[str, Any] = {}
        front = self.front
        try:
            out = await answer(front.ctx, front.app_settings, incoming, request.service, request_id, fields)
            data = _encode(out, request.close or self.eof)
        except Exception:
            # answer() turns every failure into a response; this is a bug, and the
            # connection must not stay busy (unswept) for it.
            log.exception("answering %s %s failed", incoming.method, incoming.path)
            self.close()
            return
        self._send(data, close=request.close)
        front.ctx.access_log.record(
            incoming.method,
            incoming.path,
            out.status,
            time.perf_counter() - started,
            request_id,
            incoming.remote_ip,
            fields,
        )

    def _send(self, data: bytes, *, close: bool) -> None:
        try:
            sent = self.sock.send(data)
        except (BlockingIOError, InterruptedError):
            sent = 0
        except OSError:
            self.close()
            return
        if sent < len(data):
            self.out = memoryview(data)[sent:]
            self.loop.add_writer(self.fd, self._writable, close)
            return
        self._answered(close)

    def _writable(self, close: bool) -> None:
        assert self.out is not None
        try:
            sent = self.sock.send(self.out)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            self.close()
            return
        self.out = self.out[sent:]
        if not self.out:
            self.out = None
            self.loop.remove_writer(self.fd)
            self._answered(close)

    def _answered(self, close: bool) -> None:
        if close or self.eof:
            self.close()
            return
        self.busy = False
        self.deadline = time.monotonic() + self.front.header_timeout_s
        if self.paused:
            self.paused = False
            self.loop.add_reader(self.fd, self._readable)
        if self.buf:
            self._next()

    def close(self) -> None:
        if self.sock.fileno() < 0:
            return
        self.front.clients.discard(self)
        self.loop.remove_reader(self.fd)
        if self.out is not None:
            self.loop.remove_writer(self.fd)
        self.sock.close()


def _encode(out: Answer, close: bool) -> bytes:
    reason = out.reason or responses.get(out.status, "Unknown")
    lines = [f"HTTP/1.1 {out.status} {reason}\r\n"]
    lines += [f"{k}: {v}\r\n" for k, v in out.headers]
    if out.body is not None:
        lines.append(f"Content-Length: {len(out.body)}\r\n")
    if close:
        lines.append("Connection: close\r\n")
    lines.append("\r\n")
    # Values from the instance were decoded as latin-1, so this sends its bytes unchanged.
    head = "".join(lines).encode("latin-1")
    return head + out.body if out.body else head
