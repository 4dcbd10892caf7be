"""Calls between services: the service credential, and the one client that carries it.

Internal endpoints (participants' prepare/commit, discovery registration) are never
routed by the gateway; the credential (a shared secret) keeps them closed to anything
that reaches the port directly without it. :class:`InternalClient` is how every service
calls another one's instances.
"""

from __future__ import annotations

import hmac
import itertools
import json
import logging
import secrets
from collections.abc import Callable, Container, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tornado.httpclient import AsyncHTTPClient, HTTPClientError, HTTPRequest

from common.logs import REQUEST_ID_HEADER, request_id_var
from common.tokens import write_new_file

if TYPE_CHECKING:  # common.discovery imports this module
    from common.discovery import Instance

log = logging.getLogger("barber.internal")

SERVICE_TOKEN_HEADER = "X-Service-Token"


def read_secret(path: Path) -> str:
    return Path(path).read_text().strip()


def generate_secret(path: Path) -> None:
    if path.exists() and not path.is_symlink():
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.is_symlink():  # never written through: whoever planted it chose its target
        path.unlink()
    write_new_file(path, secrets.token_urlsafe(32).encode(), 0o600)


def is_valid(presented: str | None, secret: str) -> bool:
    return presented is not None and hmac.compare_digest(presented.encode(), secret.encode())


# -- calls between services ------------------------------------------------------------
# A refusal: the callee answered, and another instance would answer the same.
REFUSALS = range(400, 500)


class Refused(Exception):
    """The callee answered with a refusal (a 4xx): a "no", not a failure to answer."""

    def __init__(self, status: int, detail: str) -> None:
        super().__init__(f"{status}: {detail}")
        self.status = status
        self.detail = detail


class Unreachable(Exception):
    """No instance answered; ``errors`` holds each instance's failure."""

    def __init__(self, service: str, errors: list[str]) -> None:
        super().__init__(f"{service} unreachable ({'; '.join(errors) or 'no instance is known'})")
        self.service = service
        self.errors = errors


class _BadAnswer(Exception):
    """An instance answered something the caller cannot read: try another."""


class InternalClient:
    """Calls one service's instances (tornado's AsyncHTTPClient) with the service
    credential and the current request id, trying each instance in turn (starting from
    the next one each call, which spreads the load) until one answers: a 2xx is the
    answer, a status in ``refusals`` raises :class:`Refused` at once, anything else (5xx,
    network error, timeout, an unreadable body) moves on to the next instance; when none
    answers, :class:`Unreachable` names every instance's error.

    Any instance can serve any call (services keep their state in their stores), so this
    is the one place that decides how internal calls fail over.
    """

    def __init__(
        self,
        service: str,
        instances: Callable[[], Sequence[Instance]],
        secret: str | None,
        *,
        timeout_s: float,
        connect_timeout_s: float | None = None,
        refusals: Container[int] = REFUSALS,
        http: AsyncHTTPClient | None = None,
    ) -> None:
        self.service = service
        self._instances = instances
        self._secret = secret
        self.timeout_s = timeout_s
        self.connect_timeout_s = timeout_s if connect_timeout_s is None else connect_timeout_s
        self._refusals = refusals
        self._turn = itertools.count()
        self._http = http
        # Per instance tried: calls made, and those that did not answer (metrics).
        self.calls = 0
        self.failures = 0

    def _headers(self) -> dict[str, str]:
        headers = {"Content-Type": "application/json"}
        if self._secret:
            headers[SERVICE_TOKEN_HEADER] = self._secret
        rid = request_id_var.get()
        if rid:
            headers[REQUEST_ID_HEADER] = rid
        return headers

    async def call(
        self, method: str, path: str, body: Any = None, *, accept: Callable[[Any], object] | None = None
    ) -> Any:
        """The JSON answer of the first instance that answers ``method path``.

        ``accept`` checks an answer (raising ValueError, KeyError or TypeError when it
        cannot be used): an instance whose answer fails it counts as not answering."""
        instances = list(self._instances())
        if instances:
            start = next(self._turn) % len(instances)
            instances = instances[start:] + instances[:start]
        payload = (
            json.dumps(body).encode() if body is not None else (b"" if method in ("POST", "PUT", "PATCH") else None)
        )
        http = self._http or AsyncHTTPClient()
        errors: list[str] = []
        for inst in instances:
            self.calls += 1
            request = HTTPRequest(
                inst.url + path,
                method=method,
                headers=self._headers(),
                body=payload,
                request_timeout=self.timeout_s,
                connect_timeout=self.connect_timeout_s,
                follow_redirects=False,
            )
            try:
                resp = await http.fetch(request, raise_error=False)
                if resp.code in self._refusals:
                    raise Refused(resp.code, _detail(resp.body))
                if not 200 <= resp.code < 300:
                    raise _BadAnswer(f"answered {resp.code}")
                try:
                    data = json.loads(resp.body) if resp.body else {}
                    if accept is not None:
                        accept(data)
                except (ValueError, KeyError, TypeError) as e:
                    raise _BadAnswer(f"answered an unreadable body ({type(e).__name__})") from e
                return data
            except _BadAnswer as e:
                error = f"{inst.address} {e}"
            except (TimeoutError, HTTPClientError, OSError) as e:
                error = f"{inst.address}: {type(e).__name__}: {e}"
            self.failures += 1
            errors.append(error)
            log.warning("%s %s on %s failed: %s", method, path.split("?", 1)[0], self.service, error)
        raise Unreachable(self.service, errors)


def _detail(body: bytes | None) -> str:
    """The ``detail`` of an error answer, or its first bytes when it has none."""
    raw = body or b""
    try:
        data = json.loads(raw)
    except ValueError:
        data = None
    if isinstance(data, dict) and "detail" in data:
        return str(data["detail"])
    return raw[:200].decode("utf-8", "replace")
