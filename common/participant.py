"""What authen and chat share as participants of the deletion coordinator.

- :class:`Participant`: what a participant does (authen's ``AuthenParticipant`` over
  PostgreSQL's prepared transactions, chat's ``ChatParticipant`` over MongoDB marks).
- The internal two-phase-commit endpoints over it (:func:`tx_routes`), served the same
  way by both services: ``/internal/tx``, ``/internal/tx/<gid>``,
  ``/internal/tx/<gid>/(prepare|commit|abort)``. They find the participant on the
  service's context object (:class:`ParticipantContext`).
- :func:`crash_point`: the test-only hook that makes a participant exit at a named
  point (``PARTICIPANT_CRASH_AT``, refused unless ``BARBER_TEST_HOOKS=1``).
- :class:`CoordinatorClient`: asks the coordinator (inside any gateway, found through
  discovery) what was decided for a transaction this participant holds prepared.
- :class:`OutcomeWatcher`: does that for every transaction left prepared too long;
  :func:`watch_outcomes` starts both for a service.
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
from collections.abc import Awaitable, Callable
from typing import Any, Protocol

from pydantic import BaseModel, ConfigDict, Field

from common import internal
from common.config import ServiceSettings
from common.discovery import InstanceView
from common.errors import BadRequest
from common.handler import CONTEXT, BaseHandler
from common.internal import InternalClient, Unreachable
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


class Participant(Protocol):
    """A deletion participant: every method is idempotent (the coordinator repeats calls
    after crashes) and takes the coordinator's global transaction id ``gid``.

    A "no" (a refusal the coordinator logs as a vote or a disagreement) is raised as an
    :class:`~common.errors.APIError` (409, 404): the handlers answer it as such."""

    async def prepare(self, gid: str, user_id: int, after_prepare: Callable[[], None] | None = None) -> str:
        """Vote yes ("prepared", or "committed" if it already did); ``after_prepare`` runs
        once the vote is durable, before the answer (the crash test hook)."""
        ...

    async def commit(self, gid: str) -> str:
        """ "committed"; 409 if aborted or never prepared here."""
        ...

    async def abort(self, gid: str) -> str:
        """ "aborted" (an unknown gid is recorded, so a late prepare is refused); 409 if committed."""
        ...

    async def state_of(self, gid: str) -> str:
        """unknown | prepared | committed | aborted."""
        ...

    async def prepared(self) -> list[dict[str, Any]]:
        """Every transaction holding anything here, ``{"gid", ...}`` (recovery's orphan scan)."""
        ...

    async def stale_prepared(self, older_than_s: float) -> list[str]:
        """The coordinator's gids held prepared here longer than ``older_than_s``."""
        ...


class ParticipantContext(Protocol):
    """What the tx handlers need of a service's context object."""

    @property
    def settings(self) -> ServiceSettings: ...

    @property
    def participant(self) -> Participant: ...


def crash_point(enabled: bool, configured: str, point: str) -> None:
    if enabled and configured == point:
        log.critical("test hook: crashing at %s", point)
        logging.shutdown()
        os._exit(70)


class CoordinatorClient:
    def __init__(self, discovery_url: str, secret: str) -> None:
        self.view = InstanceView(discovery_url, "gateway")
        # No refusals: any answer but a decision means "ask another gateway".
        self._client = InternalClient(
            "coordinator", lambda: self.view.instances, secret, timeout_s=5, connect_timeout_s=2, refusals=()
        )

    async def start(self) -> None:
        await self.view.start(initial_timeout_s=1.0)

    async def stop(self) -> None:
        await self.view.stop()

    async def outcome(self, gid: str) -> str | None:
        """'commit', 'abort', or None while undecided. Raises Unreachable when no gateway answers."""
        answer = await self._client.call(
            "GET", f"/internal/coordinator/transactions/{gid}", accept=lambda data: data["decision"]
        )
        decision: str | None = answer["decision"]
        return decision


class OutcomeWatcher:
    """A transaction left prepared here too long: ask the coordinator what was decided.

    Protects against a coordinator that died for good leaving the participant's data
    locked: after ``after_s`` the participant asks, and applies the answer itself.
    """

    def __init__(self, participant: Participant, ask: Callable[[str], Awaitable[str | None]], after_s: float) -> None:
        self.participant = participant
        self.ask = ask
        self.after_s = after_s
        self._task: asyncio.Task[None] | None = None

    async def check_once(self) -> None:
        for gid in await self.participant.stale_prepared(self.after_s):
            try:
                decision = await self.ask(gid)
                log.info("coordinator says %s for %s, left prepared here", decision or "wait", gid)
                if decision == "commit":
                    await self.participant.commit(gid)
                elif decision == "abort":
                    await self.participant.abort(gid)
            except Unreachable as e:  # no coordinator reachable: ask again next time
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


async def watch_outcomes(settings: ServiceSettings, participant: Participant) -> Callable[[], Awaitable[None]]:
    """Start asking the coordinator about transactions left prepared here; returns the stop."""
    coordinator = CoordinatorClient(settings.discovery_url, internal.read_secret(settings.service_secret_file))
    await coordinator.start()
    watcher = OutcomeWatcher(participant, coordinator.outcome, settings.participant_outcome_after_s)
    watcher.start()

    async def stop() -> None:
        await watcher.stop()
        await coordinator.stop()

    return stop


# -- the internal endpoints (service credential only) ---------------------------------
class TxHandler(BaseHandler):
    @property
    def context(self) -> ParticipantContext:
        ctx: ParticipantContext = self.settings[CONTEXT]
        return ctx

    def prepare(self) -> None:
        super().prepare()
        self.require_service()


class TxActionHandler(TxHandler):
    async def post(self, gid: str, action: str) -> None:
        participant = self.context.participant
        if action == "prepare":
            req = self.parse_body(PrepareRequest)
            settings = self.context.settings
            state = await participant.prepare(
                gid,
                req.user_id,
                after_prepare=lambda: crash_point(
                    settings.barber_test_hooks, settings.participant_crash_at, "after_prepare"
                ),
            )
        elif action == "commit":
            state = await participant.commit(gid)
        else:
            state = await participant.abort(gid)
        self.write_json({"gid": gid, "state": state})


class TxStatusHandler(TxHandler):
    async def get(self, gid: str) -> None:
        self.write_json({"gid": gid, "state": await self.context.participant.state_of(gid)})


class TxListHandler(TxHandler):
    async def get(self) -> None:
        if self.get_query_argument("state", "prepared") != "prepared":
            raise BadRequest("state: only 'prepared' can be listed")
        self.write_json({"transactions": await self.context.participant.prepared()})


def tx_routes() -> list[tuple[str, type[TxHandler]]]:
    """The participant's two-phase-commit endpoints, for a service's route table."""
    return [
        (r"/internal/tx", TxListHandler),
        (r"/internal/tx/([^/]+)", TxStatusHandler),
        (r"/internal/tx/([^/]+)/(prepare|commit|abort)", TxActionHandler),
    ]
