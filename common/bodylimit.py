"""The HTTP server's front door: bodies over the limit, malformed lengths, too many
connections, each refused with a JSON answer before it costs memory.

Tornado reads a body into memory before a handler sees it, and a body past the server's
own cap gets its bare ``400 Bad Request`` with no detail. :class:`BodyLimit` sits between
the HTTP server and the application:

- ``Content-Length`` that is not plain ASCII digits (``²`` passes ``str.isdigit``) is a
  400, and one over the service's limit a 413, answered before any of the body is read:
  it takes the connection over (``detach``, allowed while headers are received), answers
  with ``{"detail": ...}`` and the request id, and closes.
- A chunked body, which declares no length, is counted as it arrives: past the limit
  the 413 goes out at once and the rest is read and dropped (never buffered) up to
  :data:`DRAIN_BYTES` more, then the connection closes.

Until it closes, a refused connection reads and drops what the client is still sending,
for a bounded time, because closing a socket with unread data resets the connection and
the client could lose the answer. :func:`refuse_connection` answers a connection over
the server's cap with a 503 the same way.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
from collections.abc import Awaitable

import tornado.web
from tornado import httputil
from tornado.http1connection import HTTP1Connection
from tornado.iostream import IOStream, StreamClosedError

from common.errors import APIError, BadRequest, PayloadTooLarge, ServiceUnavailable
from common.logs import REQUEST_ID_HEADER, new_request_id, request_id_var, sane_request_id

log = logging.getLogger("barber.service")

# How long a refused connection keeps draining the client's body before it closes.
LINGER_S = 5.0
# A connection refused for too many connections: it has sent little or nothing yet.
REFUSED_CONNECTION_LINGER_S = 1.0
# How much of a chunked body past the limit is read (and dropped) before the connection
# is cut, so that a client still sending can read its 413 first.
DRAIN_BYTES = 1024 * 1024
_DRAIN_CHUNK = 64 * 1024
_DECIMAL = re.compile(r"[0-9]{1,19}")


def _request_id(headers: httputil.HTTPHeaders | None) -> str:
    return sane_request_id(headers.get(REQUEST_ID_HEADER) if headers is not None else None)


def error_response(error: APIError, request_id: str, reason: str) -> bytes:
    """A complete HTTP/1.1 response for ``error`` that closes the connection."""
    body = json.dumps({"detail": error.detail}).encode()
    extra = "".join(f"{k}: {v}\r\n" for k, v in error.headers.items())
    head = (
        f"HTTP/1.1 {error.status_code} {reason}\r\n"
        "Content-Type: application/json; charset=UTF-8\r\n"
        f"Content-Length: {len(body)}\r\n"
        f"{REQUEST_ID_HEADER}: {request_id}\r\n"
        f"{extra}"
        "Connection: close\r\n\r\n"
    ).encode("latin-1")
    return head + body


class BodyLimit(httputil.HTTPServerConnectionDelegate):
    """The application's connection delegate, with bad or oversize bodies refused up front."""

    def __init__(self, app: tornado.web.Application, limit: int) -> None:
        self.app = app
        self.limit = limit
        self._lingering: set[asyncio.Task[None]] = set()

    def start_request(self, server_conn: object, request_conn: httputil.HTTPConnection) -> httputil.HTTPMessageDelegate:
        return _LimitedRequest(self, self.app.start_request(server_conn, request_conn), request_conn)

    def on_close(self, server_conn: object) -> None:
        self.app.on_close(server_conn)

    def linger(self, stream: IOStream, response: bytes, seconds: float) -> None:
        task = asyncio.get_running_loop().create_task(_answer_and_linger(stream, response, seconds))
        self._lingering.add(task)
        task.add_done_callback(self._lingering.discard)

    def refuse(
        self, request_conn: HTTP1Connection, headers: httputil.HTTPHeaders, error: APIError, reason: str
    ) -> None:
        """Answer ``error`` in place of the request, whose body is never read."""
        request_id = _request_id(headers)
        request_id_var.set(request_id)
        self.linger(request_conn.detach(), error_response(error, request_id, reason), LINGER_S)


class _LimitedRequest(httputil.HTTPMessageDelegate):
    def __init__(
        self, limits: BodyLimit, inner: httputil.HTTPMessageDelegate, request_conn: httputil.HTTPConnection
    ) -> None:
        self.limits = limits
        self.inner = inner
        self.request_conn = request_conn
        self.headers: httputil.HTTPHeaders | None = None
        self.received = 0
        self.refused = False

    def headers_received(
        self, start_line: httputil.RequestStartLine | httputil.ResponseStartLine, headers: httputil.HTTPHeaders
    ) -> Awaitable[None] | None:
        self.headers = headers
        declared = headers.get("Content-Length")
        if declared is not None and isinstance(self.request_conn, HTTP1Connection):
            limit = self.limits.limit
            if not _DECIMAL.fullmatch(declared):
                log.info(
                    "refused a request with Content-Length %r", declared[:40], extra={"http.response.status_code": 400}
                )
                self.limits.refuse(
                    self.request_conn,
                    headers,
                    BadRequest("Content-Length must be a decimal number of bytes"),
                    "Bad Request",
                )
                return None
            if int(declared) > limit:
                log.info(
                    "refused a %s-byte body (limit %d) before reading it",
                    declared,
                    limit,
                    extra={"http.response.status_code": 413},
                )
                self.limits.refuse(self.request_conn, headers, PayloadTooLarge.over(limit), "Payload Too Large")
                return None
        return self.inner.headers_received(start_line, headers)

    def data_received(self, chunk: bytes) -> Awaitable[None] | None:
        if self.refused:
            return None
        self.received += len(chunk)
        if self.received > self.limits.limit and isinstance(self.request_conn, HTTP1Connection):
            self._refuse_chunked()
            return None
        return self.inner.data_received(chunk)

    def _refuse_chunked(self) -> None:
        """Past the limit in a chunked body: answer now, drop the rest, close at its end."""
        self.refused = True
        conn = self.request_conn
        assert isinstance(conn, HTTP1Connection)
        limit = self.limits.limit
        request_id = _request_id(self.headers)
        request_id_var.set(request_id)
        log.info("refused a chunked body past the limit (%d bytes)", limit, extra={"http.response.status_code": 413})
        # Written straight to the stream: Tornado would close the connection as soon as a
        # response finished mid-body, resetting it under a client that is still sending.
        sent = conn.stream.write(error_response(PayloadTooLarge.over(limit), request_id, "Payload Too Large"))
        sent.add_done_callback(lambda f: f.exception())  # a client gone already is no error
        conn.set_max_body_size(self.received + DRAIN_BYTES)

    def finish(self) -> None:
        if self.refused:
            assert isinstance(self.request_conn, HTTP1Connection)  # only those are refused
            self.request_conn.close()
            return
        self.inner.finish()

    def on_connection_close(self) -> None:
        self.inner.on_connection_close()


def refuse_connection(limits: BodyLimit, stream: IOStream, cap: int) -> None:
    """Answer a connection over the server's cap with a 503 and close it."""
    error = ServiceUnavailable(
        f"too many connections (this server holds at most {cap}); try again later", headers={"Retry-After": "1"}
    )
    limits.linger(stream, error_response(error, new_request_id(), "Service Unavailable"), REFUSED_CONNECTION_LINGER_S)


async def _answer_and_linger(stream: IOStream, response: bytes, seconds: float) -> None:
    try:
        await stream.write(response)
        async with asyncio.timeout(seconds):
            while True:
                await stream.read_bytes(_DRAIN_CHUNK, partial=True)
    except (StreamClosedError, TimeoutError):
        pass  # the client has read the answer and gone, or had its time
    finally:
        stream.close()
