"""What the gateway lets through and how: public paths, internal paths, header hygiene.

Plain functions over strings and header lists, so they are tested without HTTP.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Iterable
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
        "Connection",
        "Keep-Alive",
        "Proxy-Authenticate",
        "Proxy-Authorization",
        "Proxy-Connection",
        "TE",
        "Trailer",
        "Trailers",
        "Transfer-Encoding",
        "Upgrade",
    )
)
NOT_FORWARDED_REQUEST = HOP_BY_HOP | {
    "host",
    "content-length",
    USER_HEADER.lower(),
    USER_TYPE_HEADER.lower(),
    SERVICE_TOKEN_HEADER.lower(),
    REQUEST_ID_HEADER.lower(),
    "x-forwarded-for",
    "x-forwarded-host",
    "x-forwarded-proto",
}
NOT_FORWARDED_RESPONSE = HOP_BY_HOP | {"content-length"}
# WebSocket handshake headers the client library of the upstream leg makes itself.
WS_HANDSHAKE = frozenset(
    h.lower()
    for h in (
        "Sec-WebSocket-Key",
        "Sec-WebSocket-Version",
        "Sec-WebSocket-Extensions",
        "Sec-WebSocket-Protocol",
        "Sec-WebSocket-Accept",
        "Origin",
    )
)

IDEMPOTENT_METHODS = frozenset({"GET", "HEAD", "OPTIONS", "PUT", "DELETE", "TRACE"})

# Public paths (canonical, as forwarded) that need no token, as in the seed's demos.
# Always matched whole (fullmatch): ``$`` would also match before a trailing newline.
PUBLIC_ROUTES: tuple[tuple[frozenset[str] | None, re.Pattern[str]], ...] = (
    (frozenset({"POST"}), re.compile(r"/authen/authen/(signup|signin)/?")),
    (frozenset({"GET", "HEAD"}), re.compile(r"/authen/list/employee/?")),
    (frozenset({"GET", "HEAD"}), re.compile(r"/[a-z][a-z0-9_-]*/utilities/status/?")),
    (frozenset({"GET", "HEAD", "POST"}), re.compile(r"/authen/utilities/sleepy/?")),
    # The analytics page and its static files hold no data (its script signs in).
    (frozenset({"GET", "HEAD"}), re.compile(r"/etl/(dashboard/?|static/[A-Za-z0-9._/-]+)")),
    (frozenset({"OPTIONS"}), re.compile(r"/.*")),
)
# Test aids that the gateway routes only when ENABLE_SLEEPY is set (never in production).
TEST_ONLY_ROUTES = re.compile(r"/authen/utilities/sleepy/?")


# Both are pure and on the hot path, where the same few paths come again and again; the
# caches are bounded, and a path that raises is never cached.
@functools.lru_cache(maxsize=4096)
def is_public(method: str, path: str) -> bool:
    return any((methods is None or method in methods) and rx.fullmatch(path) for methods, rx in PUBLIC_ROUTES)


def is_test_only(path: str) -> bool:
    return TEST_ONLY_ROUTES.fullmatch(path) is not None


class UnsafePath(ValueError):
    """A path that cannot be forwarded (dot segments, encoded slashes): answered 404."""


class MalformedPath(UnsafePath):
    """A path no client should send (control characters, ``?``/``#`` once decoded, raw
    bytes that must be percent-encoded, broken escapes): answered 400."""


# RFC 3986 pchar, plus "/" between segments and "%" for escapes: anything else must come
# percent-encoded, so the gateway never has to guess how an upstream library re-encodes it.
_RAW_PATH = re.compile(r"[A-Za-z0-9\-._~!$&'()*+,;=:@/%]*")
_ESCAPE = re.compile(r"%([0-9A-Fa-f]{2})")
_BROKEN_ESCAPE = re.compile(r"%(?![0-9A-Fa-f]{2})")
_UNRESERVED = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~")
# C0 controls, DEL and C1 controls; "?" and "#" would end the path in any re-parse.
_FORBIDDEN_DECODED = re.compile(r"[\x00-\x1f\x7f-\x9f?#]")


def canonical_path(raw: str) -> str:
    """``raw`` (percent-encoded, as on the request line) in its one canonical spelling:
    escapes of unreserved characters decoded, other escapes in upper case (RFC 3986
    6.2.2). Raises :class:`MalformedPath` for what must not be sent at all."""
    if not _RAW_PATH.fullmatch(raw):
        raise MalformedPath("path holds characters that must be percent-encoded")
    if _BROKEN_ESCAPE.search(raw):
        raise MalformedPath("path holds a malformed percent-escape")

    def one(m: re.Match[str]) -> str:
        ch = chr(int(m.group(1), 16))
        return ch if ch in _UNRESERVED else "%" + m.group(1).upper()

    return _ESCAPE.sub(one, raw)


@functools.lru_cache(maxsize=4096)
def check_service_path(rest: str) -> str:
    """The service path ``/<rest>`` for ``rest`` as the client encoded it, in canonical
    form: exactly what is checked here is what is forwarded (and what rate rules see).

    Refused: control characters, ``?`` and ``#`` once decoded (:class:`MalformedPath`);
    dot segments, encoded slashes and backslashes (:class:`UnsafePath`); ``/internal/...``
    (PermissionError). So no spelling of a path reaches an internal endpoint or escapes
    the service prefix.
    """
    canonical = canonical_path(rest)
    try:
        decoded = unquote(canonical, errors="strict")
    except UnicodeDecodeError as e:
        raise MalformedPath("path is not UTF-8 once decoded") from e
    if _FORBIDDEN_DECODED.search(decoded):
        raise MalformedPath("path holds control characters, '?' or '#' once decoded")
    if "\\" in decoded or any(seg in (".", "..") for seg in decoded.split("/")):
        raise UnsafePath("path contains dot segments or invalid characters")
    if "/" in decoded and "%2F" in canonical:
        raise UnsafePath("encoded slashes are not allowed")
    first = decoded.lstrip("/").split("/", 1)[0].lower()
    if first == "internal":
        raise PermissionError("internal paths are not routed")
    return "/" + canonical


@functools.lru_cache(maxsize=1024)  # on the hot path; names repeat from request to request
def _header_key(name: str) -> str:
    """A header name as any backend might read it: case-folded, ``_`` as ``-`` (CGI and
    WSGI servers turn both into ``HTTP_X_USER``), surrounding blanks dropped."""
    return name.strip().lower().replace("_", "-")


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
        _header_key(token) for name, value in pairs if _header_key(name) == "connection" for token in value.split(",")
    }
    drop = NOT_FORWARDED_REQUEST | named | (WS_HANDSHAKE if websocket else frozenset())
    # Every spelling of a dropped name goes (X_User, x-user, X-USER...), and so does any
    # other name that normalises to an identity header's.
    out = [(k, v) for k, v in pairs if _header_key(k) not in drop]
    # Only the standard spelling extends the chain; other spellings were dropped above.
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
        token.strip().lower() for name, value in pairs if name.lower() == "connection" for token in value.split(",")
    }
    drop = NOT_FORWARDED_RESPONSE | named
    return [(k, v) for k, v in pairs if k.lower() not in drop]
