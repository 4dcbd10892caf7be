"""Calling the participants' internal endpoints (authen, chat) with the service credential.

Any instance of a participant can serve any call (their state is in their databases), so
a call tries the known instances in turn until one answers. Every call is idempotent.
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Callable, Sequence
from typing import Any

import aiohttp

from common.discovery import Instance
from common.internal import SERVICE_TOKEN_HEADER


class Unreachable(Exception):
    """No instance of the participant answered."""


class Refused(Exception):
    """The participant answered with a 4xx: a "no" vote or a permanent refusal."""

    def __init__(self, status: int, detail: str) -> None:
        super().__init__(f"{status}: {detail}")
        self.status = status
        self.detail = detail


class Participant:
    def __init__(self, name: str, instances: Callable[[], Sequence[Instance]], session: aiohttp.ClientSession,
                 secret: str, timeout_s: float, request_id: Callable[[], str | None] = lambda: None) -> None:
        self.name = name
        self._instances = instances
        self._session = session
        self._secret = secret
        self._timeout = aiohttp.ClientTimeout(total=timeout_s)
        self._turn = itertools.count()
        self._request_id = request_id

    async def call(self, method: str, path: str, body: dict[str, Any] | None = None) -> dict[str, Any]:
        instances = list(self._instances())
        if not instances:
            raise Unreachable(f"no {self.name} instance is known")
        start = next(self._turn) % len(instances)
        errors = []
        # Explicit: the gateway's shared session skips automatic headers.
        headers = {SERVICE_TOKEN_HEADER: self._secret, "Content-Type": "application/json"}
        rid = self._request_id()
        if rid:
            headers["X-Request-ID"] = rid
        for inst in instances[start:] + instances[:start]:
            try:
                async with self._session.request(method, inst.url + path, headers=headers,
                                                 data=json.dumps(body) if body is not None else None,
                                                 timeout=self._timeout) as resp:
                    raw = await resp.read()
                    data = json.loads(raw) if raw else {}
                    if resp.status < 300:
                        return data
                    if resp.status < 500:
                        raise Refused(resp.status, str(data.get("detail", raw[:200])))
                    errors.append(f"{inst.address}: {resp.status}")
            except (TimeoutError, aiohttp.ClientError, ValueError) as e:
                errors.append(f"{inst.address}: {type(e).__name__}")
        raise Unreachable(f"{self.name} unreachable ({'; '.join(errors)})")

    # -- two-phase commit ------------------------------------------------------------
    async def prepare(self, gid: str, user_id: int) -> dict[str, Any]:
        return await self.call("POST", f"/internal/tx/{gid}/prepare", {"user_id": user_id})

    async def commit(self, gid: str) -> dict[str, Any]:
        return await self.call("POST", f"/internal/tx/{gid}/commit")

    async def abort(self, gid: str) -> dict[str, Any]:
        return await self.call("POST", f"/internal/tx/{gid}/abort")

    async def prepared(self) -> list[dict[str, Any]]:
        return (await self.call("GET", "/internal/tx?state=prepared"))["transactions"]
