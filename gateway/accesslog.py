"""The gateway's access log, off the hot path: one ECS JSON line per request (the same
line as common.handler.log_request writes through ``logging``), built directly and
written in batches.

Going through ``logging`` cost about an eighth of the gateway's CPU per proxied request
(a LogRecord, the caller's frame lookup, the generic ECS formatter, a write and flush per
line). Here a line is formatted directly (only the client's values and the proxy's fields
go through the JSON encoder; nested dicts cost twice as much), appended to a buffer that
is written at most ``FLUSH_S`` later (or once ``MAX_LINES`` are waiting), in one
write. Lines of other loggers may come out of order with access lines by that much; each
carries its own ``@timestamp``. Credentials are redacted as in every other line.
"""

from __future__ import annotations

import asyncio
import json
import logging
import sys
import time
from typing import IO, Any

import tornado.web

from common.logs import level_for_status, new_id, redact

FLUSH_S = 0.05
MAX_LINES = 512
LOGGER = "barber.http"
_LEVELS = {logging.INFO: "info", logging.WARNING: "warning", logging.ERROR: "error"}
_dumps = json.JSONEncoder(separators=(",", ":"), ensure_ascii=True).encode


class AccessLog:
    def __init__(self, service_name: str, instance: str, stream: IO[str] | None = None) -> None:
        self._stream = stream
        self._service_json = _dumps({"name": service_name, "node": {"name": instance}})
        self._log_json = _dumps(
            {"logger": LOGGER, "origin": {"file": {"line": 0, "name": "accesslog.py"}, "function": "record"}}
        )
        self._logger = logging.getLogger(LOGGER)
        self._lines: list[str] = []
        self._timer: asyncio.TimerHandle | None = None
        self._second = -1
        self._stamp = ""

    # -- writing a line --------------------------------------------------------------
    def log_request(self, handler: tornado.web.RequestHandler) -> None:
        """Tornado's ``log_function``: the line for a request a handler served."""
        request = handler.request
        self.record(
            request.method or "",
            request.path,
            handler.get_status(),
            request.request_time(),
            getattr(handler, "request_id", None),
            request.remote_ip,
            getattr(handler, "log_fields", None),
        )

    def record(
        self,
        method: str,
        path: str,
        status: int,
        duration_s: float,
        request_id: str | None,
        client_ip: str | None,
        fields: dict[str, Any] | None = None,
    ) -> None:
        level = level_for_status(status)
        if not self._logger.isEnabledFor(level):
            return
        # Only the path and the request id come from the client, and only they could carry
        # a credential (the query is not logged).
        path = redact(path)
        extra = ""
        if fields:
            nested: dict[str, Any] = {}
            for key, value in sorted(fields.items()):
                if value is not None:
                    _put(nested, key, value)
            if nested:
                extra = _dumps(nested)[1:-1] + ","
        client = f'"client":{{"ip":{_dumps(client_ip)}}},' if client_ip is not None else ""
        rid = f'"id":{_dumps(redact(request_id))},' if request_id is not None else ""
        self._lines.append(
            f'{{"@timestamp":"{self._timestamp()}","log.level":"{_LEVELS.get(level, "info")}",'
            f'"message":{_dumps(f"{method} {path} {status}")},'
            f"{extra}{client}"
            f'"ecs.version":"1.6.0","event":{{"duration":{int(duration_s * 1e9)},"id":"{new_id()}"}},'
            f'"http":{{"request":{{{rid}"method":{_dumps(method)}}},"response":{{"status_code":{status}}}}},'
            f'"log":{self._log_json},"service":{self._service_json},"url":{{"path":{_dumps(path)}}}}}'
        )
        if len(self._lines) >= MAX_LINES:
            self.flush()
        elif self._timer is None:
            self._timer = asyncio.get_running_loop().call_later(FLUSH_S, self.flush)

    def _timestamp(self) -> str:
        now = time.time()
        second = int(now)
        if second != self._second:
            self._second = second
            self._stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
        return f"{self._stamp}.{int((now - second) * 1000):03d}Z"

    # -- batches ---------------------------------------------------------------------
    def flush(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if not self._lines:
            return
        lines, self._lines = self._lines, []
        stream = self._stream or sys.stdout
        try:
            stream.write("\n".join(lines) + "\n")
            stream.flush()
        except (OSError, ValueError):
            # A closed or broken stdout must not fail requests (logging would swallow it too).
            pass


def _put(line: dict[str, Any], dotted: str, value: Any) -> None:
    """``line["a"]["b"] = value`` for ``"a.b"`` (ECS nests dotted names)."""
    *parents, last = dotted.split(".")
    node = line
    for name in parents:
        node = node.setdefault(name, {})
    node[last] = value
