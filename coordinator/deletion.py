"""Deleting a user everywhere: two-phase commit, saga, and recovery of both after a crash.

2PC: log start -> prepare authen -> prepare chat -> log decision -> commit (or abort)
everywhere -> log completion. Presumed abort: a transaction without a logged decision is
aborted by recovery; one with a decision has it re-driven until every participant
acknowledges. Every participant call is idempotent, so repeating one is always safe.

Saga: deactivate the user and drop chat's cache entry (compensation: reactivate) ->
delete chats and messages in batches, saving progress after each -> delete the user ->
drop the cache entry again. From the first deleted batch on there is no way back, so
later steps are retried until done.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
import uuid
from collections.abc import Awaitable
from typing import Any

from common.errors import BadGateway, NotFound, ServiceUnavailable
from common.tasks import backoff_delay, cancel_and_wait
from coordinator.log import Transaction, TxLog, already_running, gid_of, tx_of
from coordinator.participants import ParticipantClient, Refused, Unreachable
from coordinator.settings import CoordinatorSettings

log = logging.getLogger("barber.coordinator")

PARTICIPANTS = ("authen", "chat")
SAGA_STEPS = ("deactivate", "purge_chats", "delete_user", "invalidate_cache")
# Steps before this position can be compensated; from it on, the saga only goes forward.
SAGA_PIVOT = SAGA_STEPS.index("purge_chats")


def tx_fields(tx_id: uuid.UUID | str, mode: str, state: str, action: str, **more: Any) -> dict[str, Any]:
    """ECS `extra=` for a transaction's log line (mapped in elk/templates.py)."""
    fields = {
        "event.kind": "event",
        "event.action": action,
        "barber.transaction.id": str(tx_id),
        "barber.transaction.mode": mode,
        "barber.transaction.state": state,
    }
    fields.update({k if "." in k else f"barber.transaction.{k}": v for k, v in more.items()})
    return fields


class Coordinator:
    def __init__(
        self, settings: CoordinatorSettings, txlog: TxLog, participants: dict[str, ParticipantClient], owner: str
    ) -> None:
        self.settings = settings
        self.txlog = txlog
        self.participants = participants
        self.owner = owner
        # Transactions this process is driving right now (recovery leaves them alone).
        self.active: set[uuid.UUID] = set()
        self._tasks: set[asyncio.Task[Any]] = set()
        self._recovery: asyncio.Task[None] | None = None

    # -- test hook -------------------------------------------------------------------
    def crash(self, point: str) -> None:
        """Exit at a named point, for crash tests (refused unless BARBER_TEST_HOOKS=1)."""
        if self.settings.barber_test_hooks and self.settings.coordinator_crash_at == point:
            log.critical("test hook: crashing at %s", point)
            logging.shutdown()
            os._exit(70)

    # -- entry point -----------------------------------------------------------------
    async def delete_user(self, user_id: int, mode: str) -> Transaction:
        await self._require_user(user_id)
        tx_id = uuid.uuid4()
        # Ours before it is in the log, so a recovery pass never takes it for an orphan.
        self.active.add(tx_id)
        if mode == "2pc":
            try:
                await self.txlog.begin(tx_id, "2pc", user_id, self.owner, list(PARTICIPANTS), [])
                log.info(
                    "2pc %s: deleting user %d",
                    tx_id,
                    user_id,
                    extra=tx_fields(tx_id, "2pc", "started", "deletion-start", **{"user.id": user_id}),
                )
                self.crash("after_log_start")
                await self._two_phase(tx_id, user_id)
            finally:
                self.active.discard(tx_id)
        else:
            try:
                await self.txlog.begin(tx_id, "saga", user_id, self.owner, [], list(SAGA_STEPS))
            except BaseException:
                self.active.discard(tx_id)
                raise
            log.info(
                "saga %s: deleting user %d",
                tx_id,
                user_id,
                extra=tx_fields(tx_id, "saga", "started", "deletion-start", **{"user.id": user_id}),
            )
            self._spawn(self._run_saga(tx_id, user_id))
        tx = await self.txlog.get(tx_id)
        assert tx is not None
        return tx

    async def _require_user(self, user_id: int) -> None:
        try:
            await self.participants["authen"].call("GET", f"/utilities/check?user_id={user_id}")
        except Refused as e:
            if e.status == 404:
                # A running saga deactivated the user, whom authen then hides: that is a
                # deletion under way, not an unknown user (begin's unique index says the
                # same for every other case).
                if await self.txlog.unfinished_for(user_id) is not None:
                    raise already_running(user_id) from e
                raise NotFound(f"no user with id {user_id}") from e
            raise BadGateway(f"authen refused the user lookup: {e.detail}") from e
        except Unreachable as e:
            raise ServiceUnavailable("authen is unreachable; nothing was changed, try again") from e

    def _spawn(self, coro: Awaitable[Any]) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # -- two-phase commit ------------------------------------------------------------
    async def _two_phase(self, tx_id: uuid.UUID, user_id: int) -> None:
        gid = gid_of(tx_id)
        decision, detail = "commit", None
        for name in PARTICIPANTS:
            try:
                await self.participants[name].prepare(gid, user_id)
            except Refused as e:
                decision, detail = "abort", f"{name} voted no: {e.detail}"
                await self.txlog.set_participant(tx_id, name, "voted_no", e.detail)
                break
            except Unreachable as e:
                decision, detail = "abort", f"{name} could not be reached during prepare"
                await self.txlog.set_participant(tx_id, name, "unreachable", str(e))
                break
            await self.txlog.set_participant(tx_id, name, "prepared")
            self.crash(f"after_{name}_prepared")
        decision = await self.txlog.decide(tx_id, decision, detail)
        log.info(
            "2pc %s: decision %s%s",
            tx_id,
            decision,
            f" ({detail})" if detail else "",
            extra=tx_fields(tx_id, "2pc", "decided", "deletion-decision", decision=decision),
        )
        self.crash("after_decision")
        await self._finish_2pc(tx_id, decision, self.settings.coordinator_finish_wait_s)

    async def _finish_2pc(self, tx_id: uuid.UUID, decision: str, wait_s: float) -> bool:
        """Drive the decision to every participant; True once all acknowledged it.

        An abort goes to every participant, even one that never saw the prepare, so that
        a late prepare of this transaction is refused there.
        """
        gid = gid_of(tx_id)
        done = "committed" if decision == "commit" else "aborted"
        deadline = time.monotonic() + wait_s
        attempt = 0
        while True:
            tx = await self.txlog.get(tx_id)
            assert tx is not None
            for name in PARTICIPANTS:
                if tx.participants.get(name, {}).get("state") == done:
                    continue
                participant = self.participants[name]
                try:
                    await (participant.commit(gid) if decision == "commit" else participant.abort(gid))
                except (Unreachable, Refused) as e:
                    # Refused here means a participant disagrees with a logged decision:
                    # keep the evidence and keep trying; it must never be silently dropped.
                    level = logging.ERROR if isinstance(e, Refused) else logging.WARNING
                    log.log(level, "2pc %s: %s of %s not acknowledged yet: %s", tx_id, decision, name, e)
                    await self.txlog.set_participant(tx_id, name, f"{decision}_pending", str(e))
                    continue
                await self.txlog.set_participant(tx_id, name, done)
                if decision == "commit" and name == "authen":
                    self.crash("after_authen_committed")
            tx = await self.txlog.get(tx_id)
            assert tx is not None
            if all(tx.participants[n]["state"] == done for n in PARTICIPANTS):
                await self.txlog.complete(tx_id)
                log.info(
                    "2pc %s: %s everywhere",
                    tx_id,
                    done,
                    extra=tx_fields(tx_id, "2pc", done, "deletion-finish", decision=decision),
                )
                return True
            if time.monotonic() >= deadline:
                log.warning(
                    "2pc %s: %s not yet acknowledged by all; recovery will finish it",
                    tx_id,
                    decision,
                    extra=tx_fields(tx_id, "2pc", f"{decision}_pending", "deletion-pending", decision=decision),
                )
                return False
            attempt += 1
            await asyncio.sleep(backoff_delay(attempt))

    # -- saga ------------------------------------------------------------------------
    async def _run_saga(self, tx_id: uuid.UUID, user_id: int) -> None:
        self.active.add(tx_id)
        try:
            tx = await self.txlog.get(tx_id)
            assert tx is not None
            if tx.state == "aborted":
                await self._compensate(tx_id, user_id, tx.detail or "compensating")
                return
            for step in tx.steps:
                if step["state"] == "done":
                    continue
                try:
                    await self._saga_step(tx_id, user_id, step)
                except Refused as e:
                    if step["position"] < SAGA_PIVOT:
                        await self.txlog.set_step(tx_id, step["position"], "failed")
                        detail = f"{step['name']} refused: {e.detail}"
                        await self.txlog.decide(tx_id, "abort", detail)
                        await self._compensate(tx_id, user_id, detail)
                        return
                    raise
                await self.txlog.set_step(tx_id, step["position"], "done")
            await self.txlog.decide(tx_id, "commit")
            await self.txlog.complete(tx_id)
            log.info(
                "saga %s: user %d deleted",
                tx_id,
                user_id,
                extra=tx_fields(tx_id, "saga", "committed", "deletion-finish", **{"user.id": user_id}),
            )
        except asyncio.CancelledError:
            raise
        except Exception:
            # Left unfinished in the log with its lease; recovery resumes it.
            log.exception(
                "saga %s: stopped; recovery will resume it",
                tx_id,
                extra=tx_fields(tx_id, "saga", "stopped", "deletion-stopped"),
            )
        finally:
            self.active.discard(tx_id)

    async def _forever(self, tx_id: uuid.UUID, what: str, call: Any) -> dict[str, Any]:
        """Retry a step's call until it answers (a participant may be down for a while)."""
        attempt = 0
        while True:
            try:
                return await call()
            except Unreachable as e:
                attempt += 1
                log.warning("saga %s: %s: %s; retrying", tx_id, what, e)
                await self.txlog.renew(tx_id)
                await asyncio.sleep(backoff_delay(attempt, cap=5.0))

    async def _saga_step(self, tx_id: uuid.UUID, user_id: int, step: dict[str, Any]) -> None:
        name, position = step["name"], step["position"]
        await self.txlog.set_step(tx_id, position, "running", attempt=True)
        authen, chat = self.participants["authen"], self.participants["chat"]
        if name == "deactivate":
            await self._forever(tx_id, name, lambda: authen.call("POST", f"/internal/users/{user_id}/deactivate"))
            # authen no longer shows the user; chat must not keep using a cached copy while
            # its chats are purged (nor start new chats with it).
            await self._forever(tx_id, name, lambda: chat.call("DELETE", f"/internal/cache/users/{user_id}"))
        elif name == "purge_chats":
            progress = dict(step["progress"] or {})
            progress.setdefault("chats_deleted", 0)
            progress.setdefault("messages_deleted", 0)
            batch = self.settings.coordinator_saga_batch
            while True:
                result = await self._forever(
                    tx_id, name, lambda: chat.call("POST", f"/internal/users/{user_id}/purge?limit={batch}")
                )
                progress["chats_deleted"] += int(result.get("chats_deleted", 0))
                progress["messages_deleted"] += int(result.get("messages_deleted", 0))
                progress["batches"] = progress.get("batches", 0) + 1
                await self.txlog.set_step(tx_id, position, "running", progress)
                self.crash("saga_mid")
                if result.get("done"):
                    break
        elif name == "delete_user":
            await self._forever(tx_id, name, lambda: authen.call("DELETE", f"/internal/users/{user_id}"))
        elif name == "invalidate_cache":
            await self._forever(tx_id, name, lambda: chat.call("DELETE", f"/internal/cache/users/{user_id}"))
        else:
            raise ValueError(f"unknown saga step {name}")

    async def _compensate(self, tx_id: uuid.UUID, user_id: int, detail: str) -> None:
        tx = await self.txlog.get(tx_id)
        assert tx is not None
        for step in reversed(tx.steps):
            # "failed" too: the step may have deactivated the user before its second call
            # (the cache entry) was refused. Reactivating is idempotent.
            if step["name"] == "deactivate" and step["state"] in ("done", "running", "failed"):
                try:
                    await self._forever(
                        tx_id,
                        "reactivate",
                        lambda: self.participants["authen"].call("POST", f"/internal/users/{user_id}/reactivate"),
                    )
                except Refused as e:
                    if e.status != 404:
                        raise
                    log.info("saga %s: user %d no longer exists; nothing to reactivate", tx_id, user_id)
                await self.txlog.set_step(tx_id, step["position"], "compensated")
        await self.txlog.complete(tx_id)
        log.warning(
            "saga %s: compensated (%s)",
            tx_id,
            detail,
            extra=tx_fields(tx_id, "saga", "compensated", "deletion-finish", decision="abort"),
        )

    # -- recovery --------------------------------------------------------------------
    async def recover_once(self) -> None:
        # Our own unfinished transactions that we are not driving were left by an earlier
        # run of this instance (same owner name): take them at once, not after the lease.
        for tx_id in await self.txlog.claim_unfinished(self.owner, self.active):
            tx = await self.txlog.get(tx_id)
            if tx is None:
                continue
            log.warning(
                "recovery: resuming %s %s (state %s, decision %s)",
                tx.mode,
                tx_id,
                tx.state,
                tx.decision,
                extra=tx_fields(tx_id, tx.mode, tx.state, "recovery-resume"),
            )
            if tx.mode == "saga":
                self.active.add(tx_id)
                self._spawn(self._run_saga(tx_id, tx.user_id))
                continue
            self.active.add(tx_id)
            try:
                decision = tx.decision
                if decision is None:
                    decision = await self.txlog.decide(
                        tx_id, "abort", "presumed abort: the coordinator stopped before deciding"
                    )
                    log.warning(
                        "recovery: 2pc %s had no decision: presumed abort",
                        tx_id,
                        extra={
                            **tx_fields(tx_id, "2pc", "aborting", "presumed-abort", decision=decision),
                            "event.kind": "alert",
                        },
                    )
                await self._finish_2pc(tx_id, decision, self.settings.coordinator_finish_wait_s)
            finally:
                self.active.discard(tx_id)
        await self._resolve_orphans()

    async def _resolve_orphans(self) -> None:
        """Prepared state at a participant that no live transaction here is driving."""
        for name, participant in self.participants.items():
            try:
                prepared = await participant.prepared()
            except (Unreachable, Refused):
                continue
            for item in prepared:
                tx_id = tx_of(item["gid"])
                if tx_id is None or tx_id in self.active:
                    continue
                tx = await self.txlog.get(tx_id)
                if tx is None:
                    decision = "abort"  # never logged: presumed abort
                elif tx.decision is None:
                    continue  # still being decided by its owner (its lease has not run out)
                else:
                    decision = tx.decision
                log.warning(
                    "recovery: %s holds %s prepared; sending %s",
                    name,
                    item["gid"],
                    decision,
                    extra=tx_fields(
                        tx_id,
                        tx.mode if tx else "2pc",
                        "orphan",
                        "recovery-resolve",
                        decision=decision,
                        participant=name,
                    ),
                )
                try:
                    await (participant.commit(item["gid"]) if decision == "commit" else participant.abort(item["gid"]))
                except (Unreachable, Refused) as e:
                    log.warning("recovery: could not resolve %s at %s: %s", item["gid"], name, e)

    async def outcome(self, gid: str) -> str | None:
        """What a participant left prepared should do: 'commit', 'abort', or None (wait)."""
        tx_id = tx_of(gid)
        if tx_id is None:
            return "abort"
        tx = await self.txlog.get(tx_id)
        if tx is None:
            return "abort"
        return tx.decision

    async def _recovery_loop(self) -> None:
        while True:
            try:
                await self.recover_once()
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("recovery pass failed; trying again")
            await asyncio.sleep(self.settings.coordinator_recovery_interval_s)

    def start(self) -> None:
        self._recovery = asyncio.create_task(self._recovery_loop())

    async def stop(self) -> None:
        await cancel_and_wait(self._recovery, *self._tasks)
