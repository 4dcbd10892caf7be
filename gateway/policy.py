"""What the gateway lets through and how: public paths, internal paths, header hygiene.

Plain functions over strings and header lists, so they are tested without HTTP.
"""

from __future__ import annotations

import re
from typing import Iterable
from urllib.parse import unquote

from common.internal import SERVICE_TOKEN_HEADER
from common.logs import REQUEST_ID_HEADER

USER_HEADER = "X-User"
USER_TYPE_HEADER = "X-User-Type"

# RFC 9110 7.6.1 hop-by-hop headers, plus Host and Content-Length, which the upstream
# request gets afresh, and the identity headers only the gateway may set.
HOP_BY_HOP = frozenset(
    h.lower()
    for h in (
        "Connection", "Keep-Alive", "Proxy-Authenticate", "Proxy-Authorization", "Proxy-Connection",
        "TE", "Trailer", "Trailers", "Transfer-Encoding", "Upgrade",
    )
)
NOT_FORWARDED_REQUEST = HOP_BY_HOP | {
    "host", "content-length", USER_HEADER.lower(), USER_TYPE_HEADER.lower(), SERVICE_TOKEN_HEADER.lower(),
    REQUEST_ID_HEADER.lower(), "x-forwarded-for", "x-forwarded-host", "x-forwarded-proto",
}
NOT_FORWARDED_RESPONSE = HOP_BY_HOP | {"content-length"}
# WebSocket handshake headers the client library of the upstream leg makes itself.
WS_HANDSHAKE = frozenset(
    h.lower() for h in ("Sec-WebSocket-Key", "Sec-WebSocket-Version", "Sec-WebSocket-Extensions",
                        "Sec-WebSocket-Protocol", "Sec-WebSocket-Accept", "Origin")
)

IDEMPOTENT_METHODS = frozenset({"GET", "HEAD", "OPTIONS", "PUT", "DELETE", "TRACE"})

# Public paths (as the client sends them) that need no token, as in the seed's demos.
PUBLIC_ROUTES: tuple[tuple[frozenset[str] | None, re.Pattern[str]], ...] = (
    (frozenset({"POST"}), re.compile(r"^/authen/authen/(signup|signin)/?$")),
    (frozenset({"GET", "HEAD"}), re.compile(r"^/authen/list/employee/?$")),
    (frozenset({"GET", "HEAD"}), re.compile(r"^/[a-z][a-z0-9_-]*/utilities/status/?$")),
    (frozenset({"GET", "HEAD", "POST"}), re.compile(r"^/authen/utilities/sleepy/?$")),
    # The analytics page and its static files hold no data (its script signs in).
    (frozenset({"GET", "HEAD"}), re.compile(r"^/etl/(dashboard/?|static/[A-Za-z0-9._/-]+)$")),
    (frozenset({"OPTIONS"}), re.compile(r"^/.*$")),
)


def is_public(method: str, path: str) -> bool:
    return any((methods is None or method in methods) and rx.match(path) for methods, rx in PUBLIC_ROUTES)


class UnsafePath(ValueError):
    """A path that cannot be forwarded (dot segments, encoded slashes)."""


def check_service_path(rest: str) -> str:
    """The service path ``/<rest>``; raises :class:`UnsafePath` for one that must not go.

    ``/internal/...`` never goes (the caller answers 404). Dot segments, encoded slashes
    and backslashes are refused outright, so no spelling of a path reaches an internal
    endpoint or escapes the service prefix.
    """
    decoded = unquote(rest)
    if "\\" in decoded or "\x00" in decoded or any(seg in (".", "..") for seg in decoded.split("/")):
        raise UnsafePath("path contains dot segments or invalid characters")
    if "/" in decoded and "%2f" in rest.lower():
        raise UnsafePath("encoded slashes are not allowed")
    first = decoded.lstrip("/").split("/", 1)[0].lower()
    if first == "internal":
        raise PermissionError("internal paths are not routed")
    return "/" + rest


def upstream_request_headers(
    headers: Iterable[tuple[str, str]],
    *,
    request_id: str,
    client_ip: str,
    host: str | None,
    proto: str,
    user_id: int | None,
    user_type: str | None,
    websocket: bool = False,
) -> list[tuple[str, str]]:
    """Client headers minus hop-by-hop and spoofable ones, plus what the gateway vouches for."""
    pairs = list(headers)
    # Headers named in Connection are hop-by-hop too (RFC 9110 7.6.1).
    named = {
        token.strip().lower()
        for name, value in pairs
        if name.lower() == "connection"
        for token in value.split(",")
    }
    drop = NOT_FORWARDED_REQUEST | named | (WS_HANDSHAKE if websocket else frozenset())
    out = [(k, v) for k, v in pairs if k.lower() not in drop]
    forwarded_for = [v for k, v in pairs if k.lower() == "x-forwarded-for"]
    out.append(("X-Forwarded-For", ", ".join([*forwarded_for, client_ip]) if forwarded_for else client_ip))
    if host:
        out.append(("X-Forwarded-Host", host))
    out.append(("X-Forwarded-Proto", proto))
    out.append((REQUEST_ID_HEADER, request_id))
    if user_id is not None:
        out.append((USER_HEADER, str(user_id)))
        if user_type:
            out.append((USER_TYPE_HEADER, user_type))
    return out


def downstream_response_headers(headers: Iterable[tuple[str, str]]) -> list[tuple[str, str]]:
    pairs = list(headers)
    named = {
        token.strip().lower()
        for name, value in pairs
        if name.lower() == "connection"
        for token in value.split(",")
    }
    drop = NOT_FORWARDED_RESPONSE | named
    return [(k, v) for k, v in pairs if k.lower() not in drop]


def websocket_token(query_token: str | None, subprotocols: list[str]) -> str | None:
    """The token of a WebSocket handshake: ``?token=`` or the ``Sec-WebSocket-Protocol``
    offer (browsers cannot set headers), as ``bearer.<token>`` or ``bearer, <token>``."""
    if query_token:
        return query_token
    for i, proto in enumerate(subprotocols):
        low = proto.lower()
        if low.startswith("bearer.") and len(proto) > 7:
            return proto[7:]
        if low == "bearer" and i + 1 < len(subprotocols):
            return subprotocols[i + 1]
    return None
