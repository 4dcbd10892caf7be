"""One HTTP helper for every test: a call that never raises on a status, and its reply."""

from __future__ import annotations

import json
from typing import Any

from tornado.httpclient import AsyncHTTPClient


class Reply:
    def __init__(self, code: int, body: bytes, headers: Any = None) -> None:
        self.code = code
        self.raw = body
        self.headers = headers
        try:
            self.json: Any = json.loads(body) if body else None
        except ValueError:
            self.json = None

    def __repr__(self) -> str:
        return f"<{self.code} {self.raw[:300]!r}>"


async def call(
    method: str,
    url: str,
    body: Any = None,
    *,
    token: str | None = None,
    raw: bytes | None = None,
    headers: dict[str, str] | None = None,
    timeout: float = 20.0,
    source_ip: str | None = None,
) -> Reply:
    """``body`` is sent as JSON, ``raw`` as it is; ``token`` as a bearer token. ``source_ip``
    (any 127.x works on Linux) makes the connection come from that address, so services
    see another client, as they would for another machine (each call is a connection of
    its own)."""
    hdrs = dict(headers or {})
    if token is not None:
        hdrs["Authorization"] = f"Bearer {token}"
    data: bytes | None = raw
    if body is not None:
        data = json.dumps(body).encode()
        hdrs.setdefault("Content-Type", "application/json")
    if data is None and method in ("POST", "PUT"):
        data = b""
    resp = await AsyncHTTPClient().fetch(
        url,
        method=method,
        body=data,
        headers=hdrs,
        request_timeout=timeout,
        raise_error=False,
        allow_nonstandard_methods=True,
        network_interface=source_ip,
    )
    return Reply(resp.code, resp.body or b"", resp.headers)
