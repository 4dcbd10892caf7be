"""What authen and chat share as participants of the deletion coordinator.

- :func:`crash_point`: the test-only hook that makes a participant exit at a named
  point (``PARTICIPANT_CRASH_AT``, refused unless ``BARBER_TEST_HOOKS=1``).
- :class:`CoordinatorClient`: asks the coordinator (inside any gateway, found through
  discovery) what was decided for a transaction this participant holds prepared.
- :class:`OutcomeWatcher`: does that for every transaction left prepared too long.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import re
from collections.abc import Awaitable, Callable

from pydantic import BaseModel, ConfigDict, Field
from tornado.httpclient import AsyncHTTPClient, HTTPClientError

from common.discovery import InstanceView
from common.errors import BadRequest
from common.internal import SERVICE_TOKEN_HEADER
from common.tasks import cancel_and_wait

log = logging.getLogger("barber.participant")

# The coordinator's global transaction ids start with this.
GID_PREFIX = "barber-tx-"
# A gid goes into PREPARE TRANSACTION as a literal (it cannot be a bind parameter).
_GID = re.compile(r"[A-Za-z0-9_.:-]{1,190}")


def check_gid(gid: str) -> str:
    """A transaction id every participant accepts; else 400."""
    if not _GID.fullmatch(gid):
        raise BadRequest("transaction id: 1-190 characters of letters, digits, _ . : -")
    return gid


class PrepareRequest(BaseModel):
    """The body of ``POST /internal/tx/<gid>/prepare``."""

    model_config = ConfigDict(extra="forbid")
    user_id: int = Field(ge=1)


def crash_point(enabled: bool, configured: str, point: str) -> None:
    if enabled and configured == point:
        log.critical("test hook: crashing at %s", point)
        logging.shutdown()
        os._exit(70)


class CoordinatorClient:
    def __init__(self, discovery_url: str, secret: str) -> None:
        self.view = InstanceView(discovery_url, "gateway")
        self._secret = secret

    async def start(self) -> None:
        await self.view.start(initial_timeout_s=1.0)

    async def stop(self) -> None:
        await self.view.stop()

    async def outcome(self, gid: str) -> str | None:
        """'commit', 'abort', or None while undecided. Raises when no gateway answers."""
        last: Exception | None = None
        for gateway in self.view.instances:
            try:
                resp = await AsyncHTTPClient().fetch(
                    f"{gateway.url}/internal/coordinator/transactions/{gid}",
                    headers={SERVICE_TOKEN_HEADER: self._secret}, request_timeout=5, connect_timeout=2,
                )
                decision: str | None = json.loads(resp.body)["decision"]
                return decision
            except (HTTPClientError, OSError, ValueError, KeyError) as e:
                last = e
        raise ConnectionError(f"no coordinator answered about {gid}: {last}")


class OutcomeWatcher:
    """A transaction left prepared here too long: ask the coordinator what was decided.

    Protects against a coordinator that died for good leaving the participant's data
    locked: after ``after_s`` the participant asks, and applies the answer itself.
    """

    def __init__(self, stale: Callable[[float], Awaitable[list[str]]], ask: Callable[[str], Awaitable[str | None]],
                 commit: Callable[[str], Awaitable[object]], abort: Callable[[str], Awaitable[object]],
                 after_s: float) -> None:
        self.stale = stale
        self.ask = ask
        self.commit = commit
        self.abort = abort
        self.after_s = after_s
        self._task: asyncio.Task[None] | None = None

    async def check_once(self) -> None:
        for gid in await self.stale(self.after_s):
            try:
                decision = await self.ask(gid)
                log.info("coordinator says %s for %s, left prepared here", decision or "wait", gid)
                if decision == "commit":
                    await self.commit(gid)
                elif decision == "abort":
                    await self.abort(gid)
            except ConnectionError as e:  # no coordinator reachable: ask again next time
                log.warning("%s", e)
            except Exception:  # one stuck transaction must not hold up the others
                log.exception("resolving %s failed; trying again later", gid)

    async def _loop(self) -> None:
        while True:
            await asyncio.sleep(max(1.0, self.after_s / 3))
            try:
                await self.check_once()
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("checking prepared transactions failed")

    def start(self) -> None:
        self._task = asyncio.create_task(self._loop())

    async def stop(self) -> None:
        await cancel_and_wait(self._task)
