"""ECS JSON logging: one line per event, carrying the service name and the request id."""

from __future__ import annotations

import logging
import re
import sys
import uuid
from contextvars import ContextVar

import ecs_logging

request_id_var: ContextVar[str | None] = ContextVar("request_id", default=None)

REQUEST_ID_HEADER = "X-Request-ID"


def new_request_id() -> str:
    return uuid.uuid4().hex


REQUEST_ID_RE = re.compile(r"[A-Za-z0-9._:-]{1,128}")


def sane_request_id(presented: str | None) -> str:
    """The client's X-Request-ID when it is a plain token, else a new one: it goes into
    every service's logs and headers, so it must not carry anything else."""
    return presented if presented and REQUEST_ID_RE.fullmatch(presented) else new_request_id()


class _RequestIdFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        if not hasattr(record, "http.request.id"):
            rid = request_id_var.get()
            if rid is not None:
                setattr(record, "http.request.id", rid)
        return True


def setup_logging(service_name: str, level: str = "INFO", instance: str | None = None) -> None:
    """Route every logger (tornado's included) to one ECS JSON line per event on stdout."""
    extra = {"service.name": service_name}
    if instance:
        extra["service.node.name"] = instance
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(ecs_logging.StdlibFormatter(extra=extra, exclude_fields=["process", "log.original"]))
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
