"""One proxied HTTP request, from the client's request to the answer, whichever server
parsed it.

:func:`answer` is the whole request (path rules, token, rate rule, forwarding, metrics,
access-line fields) for an :class:`Incoming` request, returning an :class:`Answer` (the
instance's response as the client gets it, or the gateway's own JSON error). Two servers
call it: the lean front (gateway.front), which parses most proxied requests itself and
writes the answer in one send, and, on connections the front handed over to Tornado,
:class:`LeanProxy`, a Tornado routing target that writes it on the HTTP/1 connection
without RequestHandler's per-request machinery (header bookkeeping, ETag, write buffers,
finish/flush). WebSocket upgrades, admin, coordinator, /status, /metrics and
/openapi.json go to their handlers.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import time
from dataclasses import dataclass
from typing import Any

import tornado
from tornado.httputil import HTTPHeaders, HTTPServerRequest, ResponseStartLine, format_timestamp, responses
from tornado.iostream import StreamClosedError
from tornado.routing import PathMatches

from common.errors import APIError, BadRequest, NotFound, PayloadTooLarge, Unauthorized
from common.handler import INFLIGHT, MAX_BODY, VERIFIER, Inflight, bearer_token
from common.logs import REQUEST_ID_HEADER, request_id_var, sane_request_id
from common.tokens import Claims, TokenVerifier, verify_or_none
from gateway.context import GatewayContext
from gateway.limiter import RateCharge
from gateway.policy import (
    MalformedPath,
    UnsafePath,
    check_service_path,
    downstream_response_headers,
    is_public,
    is_test_only,
    upstream_request_headers,
)
from gateway.proxy import UpstreamResponse

log = logging.getLogger("barber.gateway")

ROUTE_LABEL = re.compile(r"[A-Za-z0-9_-]{1,32}")
# Methods proxied; others get the ProxyHandler's 405.
PROXIED_METHODS = ("GET", "HEAD", "POST", "DELETE", "PATCH", "PUT", "OPTIONS")
_SERVER = f"TornadoServer/{tornado.version}"


@dataclass(slots=True)
class Incoming:
    """A client's request as the proxy needs it, whichever server parsed it (the lean
    front, gateway.front, or Tornado's for connections it serves)."""

    method: str
    # The target as the client encoded it, split at the first "?" (as Tornado does).
    path: str
    query: str
    headers: list[tuple[str, str]]
    remote_ip: str | None
    # The Host header (Tornado's default when there is none).
    host: str
    protocol: str
    body: bytes

    @classmethod
    def from_tornado(cls, request: HTTPServerRequest) -> Incoming:
        return cls(
            request.method or "GET",
            request.path,
            request.query,
            list(request.headers.get_all()),
            request.remote_ip,
            request.host,
            request.protocol,
            request.body,
        )

    def header(self, name: str) -> str | None:
        """The first value of header ``name`` (given in lower case)."""
        for k, v in self.headers:
            if k.lower() == name:
                return v
        return None


def service_path(path: str, service: str, *, test_routes: bool) -> str:
    """The canonical service path for ``/<service>/<rest>``, taken from the path as the
    client encoded it (Tornado's decoded path arguments are never forwarded: what is
    checked is what goes). 400 for malformed paths, 404 for internal or unsafe ones and
    for test aids unless ``test_routes``."""
    rest = path[len(service) + 2 :]
    try:
        checked = check_service_path(rest)
    except PermissionError as e:
        raise NotFound(f"no route for /{service}/{rest}") from e
    except MalformedPath as e:
        raise BadRequest(f"bad path: {e}") from e
    except UnsafePath as e:
        raise NotFound(f"no route for /{service}/{rest}: {e}") from e
    if not test_routes and is_test_only(f"/{service}{checked}"):
        raise NotFound(f"no route for /{service}{checked}")
    return checked


def client_key(claims: Claims | None, remote_ip: str | None) -> str:
    """Who a request comes from, for rate limits and breakers: the verified user, else
    the address."""
    return f"u:{claims.user_id}" if claims else f"ip:{remote_ip}"


def rate_charge(ctx: GatewayContext, method: str, public_path: str, client: str) -> RateCharge | None:
    for rule in ctx.settings.rate_limits:
        if rule.matches(method, public_path):
            # Gateways configured with the same rule share its buckets.
            return RateCharge(f"{rule.key}:{client}", rule.rate_per_s, rule.burst)
    return None


async def proxy_request(
    ctx: GatewayContext,
    verifier: TokenVerifier | None,
    request: Incoming,
    service_name: str,
    request_id: str,
    log_fields: dict[str, Any],
) -> UpstreamResponse:
    """``/<service>/<rest>`` -> ``/<rest>`` on an instance of ``<service>``. Raises
    :class:`APIError` for what the gateway answers itself; fills ``log_fields`` for the
    access line."""
    started = time.perf_counter()
    method = request.method
    service = ctx.services[service_name]
    path = service_path(request.path, service_name, test_routes=ctx.settings.enable_sleepy)
    public_path = f"/{service_name}{path}"

    token = bearer_token(request.header("authorization"))
    claims = verify_or_none(verifier, token)
    if claims is None and not is_public(method, public_path):
        ctx.metrics.rejections.labels(service_name, "unauthorized").inc()
        if token is None:
            raise Unauthorized("authentication required: send Authorization: Bearer <token>")
        raise Unauthorized("invalid or expired token")

    client = client_key(claims, request.remote_ip)
    charge = rate_charge(ctx, method, public_path, client)
    headers = upstream_request_headers(
        request.headers,
        request_id=request_id,
        client_ip=request.remote_ip or "",
        host=request.host,
        proto=request.protocol,
        user_id=claims.user_id if claims else None,
        user_type=claims.user_type if claims else None,
    )
    path_qs = path + (f"?{request.query}" if request.query else "")
    body = request.body if (request.body or method in ("POST", "PUT", "PATCH")) else None
    deadline = asyncio.get_running_loop().time() + ctx.settings.timeout_ms / 1000
    status = 0
    instance = "none"
    try:
        resp = await ctx.proxy.forward(
            service, method, path_qs, headers, body, deadline=deadline, charge=charge, client=client
        )
        status, instance = resp.status, resp.instance
        return resp
    except APIError as e:
        status = e.status_code
        raise
    finally:
        _count(ctx, service_name, path, method, status, instance, time.perf_counter() - started, log_fields)


def _count(
    ctx: GatewayContext,
    service_name: str,
    path: str,
    method: str,
    status: int,
    instance: str,
    seconds: float,
    log_fields: dict[str, Any],
) -> None:
    """Metrics of a forwarded request, and its fields on the access line (for the traffic
    dashboard)."""
    route = path[1:].split("/", 1)[0]
    # Route labels only for paths that exist (or passed the token check), so that
    # random paths cannot grow the label set without bound.
    label = f"/{service_name}/{route}" if status not in (400, 401, 404) and ROUTE_LABEL.fullmatch(route) else "other"
    m = ctx.metrics
    m.child(m.requests, service_name, label, method, str(status), instance).inc()
    m.child(m.latency, service_name).observe(seconds)
    log_fields.update(
        {"barber.route": label, "barber.upstream.service": service_name, "barber.upstream.instance": instance}
    )


def response_headers(resp: UpstreamResponse, method: str, request_id: str) -> list[tuple[str, str]]:
    """The instance's headers as the client gets them: hop-by-hop ones dropped, the
    upstream's length kept for HEAD, our request id."""
    out = [(k, v) for k, v in downstream_response_headers(resp.headers) if k.lower() != "x-request-id"]
    if method == "HEAD":
        length = next((v for k, v in resp.headers if k.lower() == "content-length"), None)
        if length is not None:
            out.append(("Content-Length", length))
    out.append((REQUEST_ID_HEADER, request_id))
    return out


def has_body(status: int, method: str) -> bool:
    return status not in (204, 304) and method != "HEAD"


class LeanMatches(PathMatches):
    """Proxied paths, for the methods the proxy forwards (others reach ProxyHandler)."""

    def match(self, request: HTTPServerRequest) -> dict[str, Any] | None:
        if request.method not in PROXIED_METHODS or request.headers.get("Upgrade", "").lower() == "websocket":
            return None
        return super().match(request)


@dataclass(slots=True)
class Answer:
    """A response to write: headers as the client gets them, ``body`` None when the
    response has none (HEAD, 204, 304)."""

    status: int
    reason: str | None
    headers: list[tuple[str, str]]
    body: bytes | None


async def answer(
    ctx: GatewayContext,
    app_settings: dict[str, Any],
    request: Incoming,
    service_name: str,
    request_id: str,
    log_fields: dict[str, Any],
) -> Answer:
    """The whole answer to a proxied request: the instance's, or the gateway's own JSON
    error (never an exception). Counted in the in-flight requests a graceful stop waits
    for."""
    inflight: Inflight = app_settings[INFLIGHT]
    inflight.count += 1
    method = request.method
    try:
        limit = app_settings.get(MAX_BODY)
        if limit is not None and len(request.body) > limit:
            raise PayloadTooLarge.over(limit)
        resp = await proxy_request(ctx, app_settings.get(VERIFIER), request, service_name, request_id, log_fields)
        return Answer(
            resp.status,
            resp.reason,
            response_headers(resp, method, request_id),
            resp.body if has_body(resp.status, method) else None,
        )
    except APIError as e:
        return error_answer(e, request_id, method)
    except Exception:
        log.exception("proxying %s %s failed", method, request.path)
        return error_answer(APIError("internal server error", status=500), request_id, method)
    finally:
        inflight.count -= 1


def error_answer(error: APIError, request_id: str, method: str) -> Answer:
    headers = [
        ("Server", _SERVER),
        ("Content-Type", "application/json; charset=UTF-8"),
        ("Date", format_timestamp(time.time())),
        (REQUEST_ID_HEADER, request_id),
        *error.headers.items(),
    ]
    body = json.dumps({"detail": error.detail}).encode()
    return Answer(error.status_code, None, headers, body if has_body(error.status_code, method) else None)


class LeanProxy:
    """The routing target of proxied paths on connections Tornado serves (those the lean
    front handed over): the request, answered on its connection."""

    openapi_exclude = True

    def __init__(self, ctx: GatewayContext) -> None:
        self.ctx = ctx
        # The Application's settings (in-flight count, verifier, body limit), once built.
        self.app_settings: dict[str, Any] = {}
        self._tasks: set[asyncio.Task[None]] = set()

    def __call__(
        self,
        request: HTTPServerRequest,
        path_args: list[bytes] | None = None,
        path_kwargs: dict[str, bytes] | None = None,
    ) -> None:
        assert path_args
        # The service name: one of the routed names (ASCII), as the route's first group.
        service_name = path_args[0].decode("ascii")
        task = asyncio.get_running_loop().create_task(self._serve(request, service_name))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _serve(self, request: HTTPServerRequest, service_name: str) -> None:
        request_id = sane_request_id(request.headers.get(REQUEST_ID_HEADER))
        request_id_var.set(request_id)
        fields: dict[str, Any] = {}
        incoming = Incoming.from_tornado(request)
        out = await answer(self.ctx, self.app_settings, incoming, service_name, request_id, fields)
        _write(request, out)
        self.ctx.access_log.record(
            incoming.method, request.path, out.status, request.request_time(), request_id, request.remote_ip, fields
        )


def _write(request: HTTPServerRequest, out: Answer) -> None:
    headers = HTTPHeaders()
    for k, v in out.headers:
        headers.add(k, v)
    if out.body is not None:
        headers["Content-Length"] = str(len(out.body))
    conn = request.connection
    assert conn is not None
    try:
        written = conn.write_headers(
            ResponseStartLine("HTTP/1.1", out.status, out.reason or responses.get(out.status, "Unknown")),
            headers,
            out.body or None,
        )
        written.add_done_callback(_retrieve)  # a client gone already is no error
        conn.finish()
    except StreamClosedError:
        pass


def _retrieve(f: asyncio.Future[None]) -> None:
    if not f.cancelled():
        f.exception()
