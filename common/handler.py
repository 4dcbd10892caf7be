"""The base Tornado handler: request ids, JSON in and out, typed errors, identity.

Handlers stay thin: parse with :meth:`BaseHandler.parse_body` / :meth:`BaseHandler.parse_query`,
call a domain function, :meth:`BaseHandler.write_json` the result. Anything raised as an
:class:`~common.errors.APIError` becomes ``{"detail": ...}`` with its status here, in
one place; anything else becomes a logged 500 without a traceback to the client.
"""

from __future__ import annotations

import ipaddress
import json
import logging
import re
from typing import Any, TypeVar

import tornado.web
from pydantic import BaseModel, ValidationError

from common import internal
from common.config import Network
from common.errors import (
    APIError,
    BadRequest,
    Forbidden,
    NotFound,
    PayloadTooLarge,
    Unauthorized,
    describe_validation_error,
)
from common.logs import REQUEST_ID_HEADER, level_for_status, request_id_var, sane_request_id
from common.openapi import implemented_methods
from common.tokens import Claims, InvalidToken, TokenVerifier, verify_or_none

log = logging.getLogger("barber.http")

M = TypeVar("M", bound=BaseModel)

# Application settings keys the base handler reads (set by common.service.make_app).
VERIFIER = "barber.verifier"
SERVICE_SECRET = "barber.service_secret"
MAX_BODY = "barber.max_body_bytes"
INFLIGHT = "barber.inflight"
TRUSTED_PROXIES = "barber.trusted_proxies"
REVOCATIONS = "barber.revocations"
# The service's one context object (its stores, clients, metrics, settings): every
# handler reaches its dependencies through ``self.context`` (a typed property in each
# service's own base handler), never through route ``initialize`` arguments or other
# settings keys.
CONTEXT = "barber.context"


def client_address(remote_ip: str | None, forwarded_for: str | None, trusted: tuple[Network, ...]) -> str:
    """The client's address: the last ``X-Forwarded-For`` entry when the peer is a trusted
    proxy (the gateway appends the address it saw last, after whatever the client sent),
    else the peer itself. A client that reaches the service directly cannot choose it."""
    peer = remote_ip or ""
    if not forwarded_for or not trusted:
        return peer
    try:
        peer_addr = ipaddress.ip_address(peer)
    except ValueError:
        return peer
    if not any(peer_addr in net for net in trusted):
        return peer
    last = forwarded_for.rsplit(",", 1)[-1].strip()
    try:
        return str(ipaddress.ip_address(last))
    except ValueError:
        return peer


class Inflight:
    """Counts requests being handled, so a graceful stop can wait for them."""

    def __init__(self) -> None:
        self.count = 0


_SURROGATE = re.compile("[\ud800-\udfff]")
# Both can only come from a \u escape (json refuses a raw U+0000, and bytes are decoded as
# UTF-8, which has no surrogates), so input without these escapes skips the walk.
_NUL_ESCAPE = re.compile(r"\\u0000")
_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")
_NUL_ESCAPE_B = re.compile(rb"\\u0000")
_SURROGATE_ESCAPE_B = re.compile(rb"\\u[dD][89a-fA-F]")


def _suspect_escapes(raw: bytes | str) -> tuple[bool, bool]:
    """Whether ``raw`` holds a U+0000 escape, a surrogate escape (cheap for the usual
    input, which has no ``\\u`` at all)."""
    if isinstance(raw, bytes):
        if b"\\u" not in raw:
            return False, False
        return bool(_NUL_ESCAPE_B.search(raw)), bool(_SURROGATE_ESCAPE_B.search(raw))
    if "\\u" not in raw:
        return False, False
    return bool(_NUL_ESCAPE.search(raw)), bool(_SURROGATE_ESCAPE.search(raw))


def _bad_text(data: Any, nul: bool, surrogates: bool) -> str | None:
    """What is wrong with the strings of decoded JSON, if anything (iteratively: nesting is
    unbounded): U+0000, or a lone surrogate (text that is not valid Unicode)."""
    pending = [data]
    while pending:
        item = pending.pop()
        if isinstance(item, str):
            if nul and "\x00" in item:
                return "text must not contain U+0000"
            if surrogates and _SURROGATE.search(item):
                return "text must be valid UTF-8 (a lone surrogate is not)"
        elif isinstance(item, dict):
            pending.extend(item.keys())
            pending.extend(item.values())
        elif isinstance(item, list):
            pending.extend(item)
    return None


def decode_json_object(raw: bytes | str, what: str = "body") -> dict[str, Any]:
    """A JSON object from a request body (or a socket frame: ``what``); anything else is a 400.

    Refused as well: nesting too deep for the decoder (RecursionError, which json raises
    instead of ValueError); U+0000 in any string, which PostgreSQL text cannot hold; and a
    lone surrogate (``"\\ud800"``), which json accepts but no UTF-8 store can encode (BSON,
    PostgreSQL): a clear 400 here rather than a failed write later, perhaps in one batch
    with other people's messages.
    """
    try:
        data = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as e:
        raise BadRequest(f"{what} is not valid JSON") from e
    except RecursionError as e:
        raise BadRequest(f"{what} is nested too deeply") from e
    if not isinstance(data, dict):
        raise BadRequest(f"{what} must be a JSON object")
    nul, surrogates = _suspect_escapes(raw)
    if nul or surrogates:
        problem = _bad_text(data, nul, surrogates)
        if problem is not None:
            raise BadRequest(f"{what}: {problem}")
    return data


def validate(model: type[M], data: Any) -> M:
    """Validate plain data into ``model``, turning failures into a 400 naming the field."""
    try:
        return model.model_validate(data)
    except ValidationError as e:
        raise BadRequest(describe_validation_error(e)) from e


def bearer_token(authorization: str | None) -> str | None:
    if not authorization:
        return None
    scheme, _, token = authorization.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        return None
    return token.strip()


def websocket_token(query_token: str | None, subprotocols: list[str], authorization: str | None = None) -> str | None:
    """The token of a WebSocket handshake, from ``?token=``, the ``Sec-WebSocket-Protocol``
    offer (browsers cannot set headers there) as ``bearer.<token>`` or ``bearer, <token>``,
    or an ``Authorization: Bearer`` header (non-browser clients). The gateway and chat both
    read it here, so every form the gateway accepts reaches chat too."""
    if query_token:
        return query_token
    for i, proto in enumerate(subprotocols):
        low = proto.lower()
        if low.startswith("bearer.") and len(proto) > 7:
            return proto[7:]
        if low == "bearer" and i + 1 < len(subprotocols):
            return subprotocols[i + 1]
    return bearer_token(authorization)


def offered_subprotocols(header: str | None) -> list[str]:
    return [p.strip() for p in (header or "").split(",") if p.strip()]


class BaseHandler(tornado.web.RequestHandler):
    request_id: str
    _counted = False

    # -- lifecycle -----------------------------------------------------------------
    def prepare(self) -> None:
        self.request_id = sane_request_id(self.request.headers.get(REQUEST_ID_HEADER))
        request_id_var.set(self.request_id)
        self.set_header(REQUEST_ID_HEADER, self.request_id)
        inflight: Inflight | None = self.settings.get(INFLIGHT)
        if inflight is not None:
            inflight.count += 1
            self._counted = True
        # A declared length over the limit never gets here (common.bodylimit refuses it
        # unread); this catches chunked bodies, which declare none.
        limit = self.settings.get(MAX_BODY)
        if limit is not None and len(self.request.body) > limit:
            raise PayloadTooLarge.over(limit)

    def _uncount(self) -> None:
        if self._counted:
            self._counted = False
            self.settings[INFLIGHT].count -= 1

    def on_finish(self) -> None:
        self._uncount()

    def on_connection_close(self) -> None:
        self._uncount()
        super().on_connection_close()

    def set_default_headers(self) -> None:
        self.set_header("Content-Type", "application/json; charset=UTF-8")

    @property
    def context(self) -> Any:
        """The service's context object (``make_app(..., context=...)``). Each service's
        base handler narrows the type: ``def context(self) -> ChatContext``."""
        return self.settings[CONTEXT]

    # -- output --------------------------------------------------------------------
    def write_json(self, obj: Any, status: int = 200) -> None:
        self.set_status(status)
        if isinstance(obj, BaseModel):
            body = obj.model_dump_json()
        else:
            body = json.dumps(obj, default=str)
        self.finish(body)

    def write_error(self, status_code: int, **kwargs: Any) -> None:
        exc = kwargs.get("exc_info", (None, None, None))[1]
        if hasattr(self, "request_id"):
            self.set_header(REQUEST_ID_HEADER, self.request_id)
        if status_code == 405:
            # RFC 9110 15.5.6: a 405 lists the methods the resource does support.
            self.set_header("Allow", ", ".join(implemented_methods(type(self))))
        if isinstance(exc, APIError):
            detail = exc.detail
            for name, value in exc.headers.items():
                self.set_header(name, value)
        elif isinstance(exc, tornado.web.HTTPError):
            detail = exc.reason or self._reason
        else:
            detail = "internal server error"
        self.finish(json.dumps({"detail": detail}))

    # -- input ---------------------------------------------------------------------
    def parse_body(self, model: type[M]) -> M:
        ctype = self.request.headers.get("Content-Type", "").split(";")[0].strip().lower()
        if ctype != "application/json":
            raise BadRequest("Content-Type must be application/json")
        return validate(model, decode_json_object(self.request.body or b""))

    def parse_query(self, model: type[M]) -> M:
        """The query string validated into ``model`` (a :class:`common.openapi.QueryModel`):
        the last value of each parameter, as ``get_query_argument`` takes it; bounds and
        types come from the model's fields, so a bad value is a 400 naming the parameter."""
        data = {
            name: self.decode_argument(values[-1], name=name)
            for name, values in self.request.query_arguments.items()
            if values
        }
        return validate(model, data)

    def parse_path(self, model: type[M], *groups: str) -> M:
        """The route's groups (the handler method's arguments) validated into ``model``."""
        return validate(model, dict(zip(model.model_fields, groups)))

    # -- identity ------------------------------------------------------------------
    def get_current_user(self) -> Claims | None:
        """Claims of a valid bearer token, or None. Client-sent X-User is never trusted."""
        return verify_or_none(self.settings.get(VERIFIER), bearer_token(self.request.headers.get("Authorization")))

    def require_user(self, *types: str) -> Claims:
        """The caller's verified claims; 401 without a valid token, 403 for another user type."""
        token = bearer_token(self.request.headers.get("Authorization"))
        if token is None:
            raise Unauthorized("authentication required: send Authorization: Bearer <token>")
        try:
            verifier: TokenVerifier = self.settings[VERIFIER]
            claims = verifier.verify(token)
        except InvalidToken as e:
            raise Unauthorized(str(e)) from e
        if types and claims.user_type not in types:
            raise Forbidden(f"only {' or '.join(types)} users may do this")
        return claims

    def client_ip(self) -> str:
        """The client's address (see :func:`client_address`): never taken from a header
        unless the peer is one of ``TRUSTED_PROXIES``."""
        return client_address(
            self.request.remote_ip, self.request.headers.get("X-Forwarded-For"), self.settings.get(TRUSTED_PROXIES, ())
        )

    def has_service_credential(self) -> bool:
        secret: str | None = self.settings.get(SERVICE_SECRET)
        return secret is not None and internal.is_valid(self.request.headers.get(internal.SERVICE_TOKEN_HEADER), secret)

    def may_see_details(self) -> bool:
        """Operational details (addresses, errors) are for other services and admins only."""
        if self.has_service_credential():
            return True
        claims = self.get_current_user()
        return claims is not None and claims.user_type == "admin"

    def require_service(self) -> None:
        """Internal endpoints: only callers holding the service credential."""
        if not self.has_service_credential():
            raise Forbidden("service credential required")


class NotFoundHandler(BaseHandler):
    def prepare(self) -> None:
        super().prepare()
        raise NotFound(f"no route for {self.request.method} {self.request.path}")


def log_request(handler: tornado.web.RequestHandler) -> None:
    """The access log: one ECS line per request, level by outcome."""
    status = handler.get_status()
    request = handler.request
    log.log(
        level_for_status(status),
        "%s %s %d",
        request.method,
        request.path,
        status,
        extra={
            "http.request.method": request.method,
            "url.path": request.path,
            "http.response.status_code": status,
            "event.duration": int(request.request_time() * 1e9),
            "http.request.id": getattr(handler, "request_id", None),
            "client.ip": request.remote_ip,
            # A handler may add fields of its own (mapped under barber.* in elk/templates.py).
            **getattr(handler, "log_fields", {}),
        },
    )
