"""Refuse a declared oversize body with a JSON 413 before reading any of it.

Tornado reads a body into memory before a handler sees it, and a body past the server's
own cap gets its bare ``400 Bad Request`` with no detail. This delegate sits between the
HTTP server and the application: when ``Content-Length`` is over the service's limit it
takes the connection over (``detach``, allowed while headers are received), answers 413
with ``{"detail": ...}`` and the request id, and closes. Until it closes it reads and
drops what the client is still sending, for a bounded time, because closing a socket
with unread data resets the connection and the client could lose the answer.

Bodies without a length (chunked) are still limited by the handler once read.
"""

from __future__ import annotations

import asyncio
import json
import logging

import tornado.web
from tornado import httputil
from tornado.http1connection import HTTP1Connection
from tornado.iostream import IOStream, StreamClosedError

from common.errors import PayloadTooLarge
from common.logs import REQUEST_ID_HEADER, new_request_id, request_id_var

log = logging.getLogger("barber.service")

# How long a refused connection keeps draining the client's body before it closes.
LINGER_S = 5.0
_DRAIN_CHUNK = 64 * 1024


class BodyLimit(httputil.HTTPServerConnectionDelegate):
    """The application's connection delegate, with oversize bodies refused up front."""

    def __init__(self, app: tornado.web.Application, limit: int) -> None:
        self.app = app
        self.limit = limit
        self._lingering: set[asyncio.Task[None]] = set()

    def start_request(self, server_conn: object,
                      request_conn: httputil.HTTPConnection) -> httputil.HTTPMessageDelegate:
        return _LimitedRequest(self, self.app.start_request(server_conn, request_conn), request_conn)

    def on_close(self, server_conn: object) -> None:
        self.app.on_close(server_conn)

    def refuse(self, request_conn: HTTP1Connection, headers: httputil.HTTPHeaders, length: int) -> None:
        request_id = headers.get(REQUEST_ID_HEADER) or new_request_id()
        request_id_var.set(request_id)
        stream = request_conn.detach()
        error = PayloadTooLarge.over(self.limit)
        body = json.dumps({"detail": error.detail}).encode()
        head = (
            f"HTTP/1.1 {error.status_code} Payload Too Large\r\n"
            "Content-Type: application/json; charset=UTF-8\r\n"
            f"Content-Length: {len(body)}\r\n"
            f"{REQUEST_ID_HEADER}: {request_id}\r\n"
            "Connection: close\r\n\r\n"
        ).encode("latin-1")
        log.info("refused a %d-byte body (limit %d) before reading it", length, self.limit,
                 extra={"http.response.status_code": error.status_code})
        task = asyncio.get_running_loop().create_task(_answer_and_linger(stream, head + body))
        self._lingering.add(task)
        task.add_done_callback(self._lingering.discard)


class _LimitedRequest(httputil.HTTPMessageDelegate):
    def __init__(self, limits: BodyLimit, inner: httputil.HTTPMessageDelegate,
                 request_conn: httputil.HTTPConnection) -> None:
        self.limits = limits
        self.inner = inner
        self.request_conn = request_conn

    def headers_received(self, start_line: httputil.RequestStartLine | httputil.ResponseStartLine,
                         headers: httputil.HTTPHeaders) -> object:
        declared = headers.get("Content-Length", "")
        if declared.isdigit() and int(declared) > self.limits.limit and isinstance(self.request_conn,
                                                                                   HTTP1Connection):
            self.limits.refuse(self.request_conn, headers, int(declared))
            return None
        return self.inner.headers_received(start_line, headers)

    def data_received(self, chunk: bytes) -> object:
        return self.inner.data_received(chunk)

    def finish(self) -> None:
        self.inner.finish()

    def on_connection_close(self) -> None:
        self.inner.on_connection_close()


async def _answer_and_linger(stream: IOStream, response: bytes) -> None:
    try:
        await stream.write(response)
        async with asyncio.timeout(LINGER_S):
            while True:
                await stream.read_bytes(_DRAIN_CHUNK, partial=True)
    except (StreamClosedError, TimeoutError):
        pass  # the client has read the answer and gone, or had its time
    finally:
        stream.close()
