"""Calling the participants' internal endpoints (authen, chat).

Any instance of a participant can serve any call (their state is in their databases), so
a call tries the known instances in turn until one answers (:class:`common.internal.InternalClient`).
A 4xx is :class:`Refused` (a "no" vote or a permanent refusal); no instance answering is
:class:`Unreachable`. Every call is idempotent.
"""

from __future__ import annotations

from typing import Any

from common.internal import InternalClient, Refused, Unreachable

__all__ = ["ParticipantClient", "Refused", "Unreachable"]


class ParticipantClient:
    def __init__(self, client: InternalClient) -> None:
        self.name = client.service
        self._client = client

    async def call(self, method: str, path: str, body: dict[str, Any] | None = None) -> dict[str, Any]:
        return await self._client.call(method, path, body)

    # -- two-phase commit ------------------------------------------------------------
    async def prepare(self, gid: str, user_id: int) -> dict[str, Any]:
        return await self.call("POST", f"/internal/tx/{gid}/prepare", {"user_id": user_id})

    async def commit(self, gid: str) -> dict[str, Any]:
        return await self.call("POST", f"/internal/tx/{gid}/commit")

    async def abort(self, gid: str) -> dict[str, Any]:
        return await self.call("POST", f"/internal/tx/{gid}/abort")

    async def prepared(self) -> list[dict[str, Any]]:
        return (await self.call("GET", "/internal/tx?state=prepared"))["transactions"]
