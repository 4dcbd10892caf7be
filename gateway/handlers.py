"""The gateway's handlers: the HTTP and WebSocket proxy, /status and /metrics.

Routes are built by :func:`routes` at the bottom, from the routed service names; the
app mounts the coordinator's routes (``/admin/...``) before them.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import time
from typing import Any

import tornado.httputil
import tornado.web
import tornado.websocket
from tornado.httpclient import HTTPClientError, HTTPRequest
from tornado.httputil import HTTPServerRequest
from tornado.routing import PathMatches, Rule

from common.errors import APIError, BadGateway
from common.handler import CONTEXT, VERIFIER, BaseHandler, offered_subprotocols, websocket_token
from common.logs import REQUEST_ID_HEADER, request_id_var, sane_request_id
from common.openapi import TEXT_PLAIN, StatusBody, api
from common.tokens import verify_or_none
from gateway.context import GatewayContext
from gateway.forwarding import (
    Incoming,
    LeanMatches,
    LeanProxy,
    client_key,
    has_body,
    proxy_request,
    response_headers,
    service_path,
)
from gateway.metrics import CONTENT_TYPE_LATEST
from gateway.policy import upstream_request_headers

log = logging.getLogger("barber.gateway")


class GatewayHandler(BaseHandler):
    @property
    def context(self) -> GatewayContext:
        return self.settings[CONTEXT]


class ProxyHandler(GatewayHandler):
    """``/<service>/<rest>`` -> ``/<rest>`` on an instance of ``<service>``."""

    SUPPORTED_METHODS = ("GET", "HEAD", "POST", "DELETE", "PATCH", "PUT", "OPTIONS")
    # Its operations are the services' own, which the public document takes from them.
    openapi_exclude = True

    def compute_etag(self) -> None:
        # The upstream's ETag (if any) is passed through; the gateway adds none.
        return None

    async def _proxy(self, service_name: str, _rest: str) -> None:
        # Requests of the proxied methods are served by forwarding.LeanProxy; this path
        # serves the same requests when routed here (and answers 405 to other methods).
        self.log_fields: dict[str, Any] = {}
        method = self.request.method or "GET"
        resp = await proxy_request(
            self.context,
            self.settings.get(VERIFIER),
            Incoming.from_tornado(self.request),
            service_name,
            self.request_id,
            self.log_fields,
        )
        self.set_status(resp.status, resp.reason or None)
        for name in ("Content-Type", "Server", "Date"):
            self.clear_header(name)
        for name, value in response_headers(resp, method, self.request_id):
            self.add_header(name, value)
        self.finish(resp.body if has_body(resp.status, method) else None)

    get = post = put = patch = delete = head = options = _proxy


class WebSocketMatches(PathMatches):
    """Matches only WebSocket upgrade requests, so one path serves both kinds."""

    def match(self, request: HTTPServerRequest) -> dict[str, Any] | None:
        if request.headers.get("Upgrade", "").lower() != "websocket":
            return None
        return super().match(request)


class WebSocketProxyHandler(tornado.websocket.WebSocketHandler):
    """A client socket joined to a socket on an instance; frames and close codes pass
    both ways. The token comes from ``?token=`` or ``Sec-WebSocket-Protocol``; without
    a valid one the socket is accepted and closed with 4401, as the chat protocol says."""

    request_id: str
    openapi_exclude = True
    _upstream: tornado.websocket.WebSocketClientConnection | None = None
    _reject: tuple[int, str] | None = None
    _pump: asyncio.Task[None] | None = None
    _service_name = ""

    @property
    def context(self) -> GatewayContext:
        return self.settings[CONTEXT]

    def check_origin(self, origin: str) -> bool:
        # Any origin: the credential is the bearer token, never a cookie.
        return True

    def write_error(self, status_code: int, **kwargs: Any) -> None:
        exc = kwargs.get("exc_info", (None, None, None))[1]
        self.set_header("Content-Type", "application/json; charset=UTF-8")
        self.set_header(REQUEST_ID_HEADER, self.request_id)
        if isinstance(exc, APIError):
            for k, v in exc.headers.items():
                self.set_header(k, v)
            detail = exc.detail
        else:
            detail = self._reason
        self.finish(json.dumps({"detail": detail}))

    async def prepare(self) -> None:
        self.request_id = sane_request_id(self.request.headers.get(REQUEST_ID_HEADER))
        request_id_var.set(self.request_id)
        self.set_header(REQUEST_ID_HEADER, self.request_id)
        service_name = self.path_args[0]
        self._service_name = service_name
        path = service_path(self.request.path, service_name, test_routes=self.context.settings.enable_sleepy)
        offered = offered_subprotocols(self.request.headers.get("Sec-WebSocket-Protocol"))
        token = websocket_token(
            self.get_query_argument("token", None), offered, self.request.headers.get("Authorization")
        )
        claims = verify_or_none(self.settings.get(VERIFIER), token)
        if claims is None:
            self.context.metrics.rejections.labels(service_name, "unauthorized").inc()
            self._reject = (4401, "not authenticated")
            return
        headers = upstream_request_headers(
            self.request.headers.get_all(),
            request_id=self.request_id,
            client_ip=self.request.remote_ip or "",
            host=self.request.host,
            proto=self.request.protocol,
            user_id=claims.user_id,
            user_type=claims.user_type,
            websocket=True,
        )
        self._upstream = await self._connect(
            service_name, path, headers, offered, client_key(claims, self.request.remote_ip)
        )

    async def _connect(
        self, service_name: str, path: str, headers: list[tuple[str, str]], subprotocols: list[str], client: str
    ) -> tornado.websocket.WebSocketClientConnection:
        ctx = self.context
        service = ctx.services[service_name]
        query = f"?{self.request.query}" if self.request.query else ""
        tried: set[str] = set()
        deadline = time.monotonic() + ctx.settings.timeout_ms / 1000
        last_error = ""
        for _ in range(ctx.settings.max_retries + 1):
            chosen = ctx.proxy.pick_for_socket(service, tried)
            inst = chosen.instance
            tried.add(inst.address)
            hdrs = tornado.httputil.HTTPHeaders()
            for k, v in headers:
                hdrs.add(k, v)
            request = HTTPRequest(
                f"ws://{inst.address}{path}{query}",
                headers=hdrs,
                connect_timeout=ctx.settings.upstream_connect_timeout_ms / 1000,
                request_timeout=max(0.001, deadline - time.monotonic()),
            )
            try:
                conn = await tornado.websocket.websocket_connect(
                    request, subprotocols=subprotocols or None, max_message_size=self.max_message_size
                )
            except HTTPClientError as e:
                if e.code == 599:  # never reached an answer: connect failure or timeout
                    ctx.proxy.record(service, chosen, ok=False)
                    last_error = str(e)
                    if time.monotonic() >= deadline:
                        break
                    continue
                # The instance answered the handshake with an HTTP error: pass it on.
                ctx.proxy.record(service, chosen, ok=e.code < 500, client=client)
                raise APIError(_detail_of(e), status=e.code) from e
            except OSError as e:
                ctx.proxy.record(service, chosen, ok=False)
                last_error = str(e)
                continue
            ctx.proxy.record(service, chosen, ok=True)
            return conn
        raise BadGateway(f"cannot open a socket to {service_name}: {last_error or 'no instance answered'}.")

    def select_subprotocol(self, subprotocols: list[str]) -> str | None:
        if self._upstream is not None:
            return self._upstream.selected_subprotocol
        # Rejecting (4401): browsers fail a handshake that selects none of their offers,
        # and the close code would never reach the client.
        return subprotocols[0] if subprotocols else None

    def get_compression_options(self) -> None:
        return None

    def open(self, *args: str) -> None:
        if self._reject is not None:
            self.close(*self._reject)
            return
        self.context.metrics.websockets.labels(self._service_name).inc()
        self._pump = asyncio.create_task(self._pump_upstream())

    async def _pump_upstream(self) -> None:
        upstream = self._upstream
        assert upstream is not None
        try:
            while True:
                message = await upstream.read_message()
                if message is None:
                    break
                await self.write_message(message, binary=isinstance(message, bytes))
        except tornado.websocket.WebSocketClosedError:
            pass
        finally:
            if self.ws_connection is not None and not self.ws_connection.is_closing():
                self.close(*_close_to_client(upstream.close_code, upstream.close_reason))
            upstream.close()

    async def on_message(self, message: str | bytes) -> None:
        if self._upstream is None:
            return
        try:
            await self._upstream.write_message(message, binary=isinstance(message, bytes))
        except tornado.websocket.WebSocketClosedError:
            self.close(1011, "upstream closed")

    def on_close(self) -> None:
        if self._reject is None:
            self.context.metrics.websockets.labels(self._service_name).dec()
        if self._upstream is not None:
            code = self.close_code
            self._upstream.close(code if code and code not in (1005, 1006) else 1000, self.close_reason)


def _close_to_client(code: int | None, reason: str | None) -> tuple[int, str | None]:
    """The close frame for the client when the instance's socket ended."""
    if code is None or code == 1006:
        return 1011, "upstream connection lost"  # dropped without a close frame
    if code == 1005:
        return 1000, None  # closed without a code: 1005 itself may not be sent
    return code, reason


def _detail_of(e: HTTPClientError) -> str:
    try:
        body = json.loads(e.response.body) if e.response is not None and e.response.body else {}
        if isinstance(body, dict) and isinstance(body.get("detail"), str):
            return body["detail"]
    except ValueError:
        pass
    return f"upstream refused the socket ({e.code})"


class StatusHandler(GatewayHandler):
    """Public: up. Instance addresses, breakers, limits and configuration only for callers
    with the service credential or an admin token (and only then computed: it reads Redis)."""

    @api("The gateway: instances with breaker state, in-flight and load", responses={200: StatusBody})
    async def get(self) -> None:
        if not self.may_see_details():
            s = self.context.settings
            self.write_json({"status": "ok", "service": "gateway", "instance": f"{s.advertise_host}:{s.port}"})
            return
        self.write_json(await self.context.status())


class MetricsHandler(GatewayHandler):
    @api("Prometheus metrics of this gateway", responses={200: TEXT_PLAIN})
    def get(self) -> None:
        self.context.refresh_gauges()
        self.set_header("Content-Type", CONTENT_TYPE_LATEST)
        self.finish(self.context.metrics.render())


class OpenAPIHandler(GatewayHandler):
    @api("This document: the public API (OpenAPI 3.1)", responses={200: dict[str, Any]})
    def get(self) -> None:
        self.finish(self.context.spec.body)


def routes(services: list[str], lean: LeanProxy | None = None) -> list[Any]:
    names = "|".join(re.escape(s) for s in services)
    return [
        (r"/status", StatusHandler),
        (r"/metrics", MetricsHandler),
        (r"/openapi.json", OpenAPIHandler),
        Rule(WebSocketMatches(rf"/({names})/(.*)"), WebSocketProxyHandler),
        *([Rule(LeanMatches(rf"/({names})/(.*)"), lean)] if lean is not None else []),
        (rf"/({names})/(.*)", ProxyHandler),
    ]
