"""ECS JSON logging: one line per event, carrying the service name and the request id.

Every line passes through :func:`redact` on its way out, whichever logger wrote it
(tornado's own messages quote the full URI, ``?token=`` included, and its uncaught
exception report prints the request's headers): tokens never reach a log file.
"""

from __future__ import annotations

import itertools
import logging
import re
import secrets
import sys
from contextvars import ContextVar

import ecs_logging

request_id_var: ContextVar[str | None] = ContextVar("request_id", default=None)

REQUEST_ID_HEADER = "X-Request-ID"

REDACTED = "[REDACTED]"

# What a credential looks like in a log line: a query parameter named like a token, an
# Authorization / Sec-WebSocket-Protocol bearer value, a service credential header, or
# anything shaped like a JWT (base64url JSON header "eyJ..." and two more segments).
_SECRETS = re.compile(
    r"(?P<q>(?:access_token|id_token|token)=)[^&\s\"'\\]+"
    r"|(?P<b>bearer(?:\s*,\s*|\s+|\.))[A-Za-z0-9._~+/=-]{8,}"
    r"|(?P<s>x-service-token['\"]?\s*[:=]\s*['\"]?)[^\s'\",}\\]+"
    r"|eyJ[A-Za-z0-9_-]{2,}\.[A-Za-z0-9_-]{2,}\.[A-Za-z0-9_-]+",
    re.IGNORECASE,
)


def _replace(m: re.Match[str]) -> str:
    prefix = m.group("q") or m.group("b") or m.group("s") or ""
    return prefix + REDACTED


# Every pattern above contains one of these (case-folded): lines without any, nearly
# all of them, skip the regular expression.
_TRIGGERS = ("token", "bearer", "eyj")


def redact(text: str) -> str:
    """``text`` with every token-like value replaced by ``[REDACTED]``."""
    folded = text.lower()
    if not any(t in folded for t in _TRIGGERS):
        return text
    return _SECRETS.sub(_replace, text)


# Ids are this process's random 64-bit prefix and a counter: unique like uuid4's 32 hex
# digits, without reading the OS's random source for each (a per-request cost).
_ID_PREFIX = secrets.token_hex(8)
_id_counter = itertools.count(secrets.randbelow(1 << 32))


def new_id() -> str:
    """A unique id (32 hex digits) for a request or an event."""
    return f"{_ID_PREFIX}{next(_id_counter) & 0xFFFFFFFFFFFFFFFF:016x}"


new_request_id = new_id


REQUEST_ID_RE = re.compile(r"[A-Za-z0-9._:-]{1,128}")


def sane_request_id(presented: str | None) -> str:
    """The client's X-Request-ID when it is a plain token, else a new one: it goes into
    every service's logs and headers, so it must not carry anything else."""
    return presented if presented and REQUEST_ID_RE.fullmatch(presented) else new_request_id()


class _RequestIdFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        # The event's own id: Filebeat makes it the document id, so a line shipped twice
        # (a retry after a crash) is stored once.
        if not hasattr(record, "event.id"):
            setattr(record, "event.id", new_id())
        if not hasattr(record, "http.request.id"):
            rid = request_id_var.get()
            if rid is not None:
                setattr(record, "http.request.id", rid)
        return True


class RedactingFormatter(ecs_logging.StdlibFormatter):
    """The ECS line with credentials removed: applied to the finished line, so the
    message, its arguments, extra fields and exception traces are all covered."""

    def format(self, record: logging.LogRecord) -> str:
        return redact(super().format(record))


def setup_logging(service_name: str, level: str = "INFO", instance: str | None = None) -> None:
    """Route every logger (tornado's included) to one ECS JSON line per event on stdout."""
    extra = {"service.name": service_name}
    if instance:
        extra["service.node.name"] = instance
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(RedactingFormatter(extra=extra, exclude_fields=["process", "log.original"]))
    handler.addFilter(_RequestIdFilter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # Tornado's own access log is replaced by the base handler's ECS access line.
    logging.getLogger("tornado.access").disabled = True


def level_for_status(status: int) -> int:
    if status >= 500:
        return logging.ERROR
    if status >= 400:
        return logging.WARNING
    return logging.INFO
