"""authen as a participant of the deletion coordinator.

Two-phase commit: prepare locks and deletes the user in one transaction and leaves it
prepared (``PREPARE TRANSACTION '<gid>'``); commit/abort is ``COMMIT PREPARED`` /
``ROLLBACK PREPARED`` from whichever instance is asked, since the prepared transaction
lives in the database, not in a process. The outcome is recorded in ``participant_tx``
inside the prepared transaction itself (so a commit leaves "committed" behind), and an
abort is recorded on its own, so a prepare that arrives after its abort is refused.

Saga steps: deactivate / reactivate / delete, each idempotent.

A committed deletion, a deactivation and a saga deletion revoke the user's tokens
(``revoke``, :func:`common.tokens.revoke_user`) before they answer, so the coordinator
retries the step until the revocation is recorded too (a 503 when Redis is away).

Every method here is idempotent: the coordinator repeats calls after crashes.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import Any

from sqlalchemy import text
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import AsyncConnection

from common.errors import Conflict, NotFound
from common.participant import GID_PREFIX, check_gid
from replicas import ReadWriteRouter

log = logging.getLogger("barber.authen.participant")

_LOCK_NOT_AVAILABLE = "55P03"
_UNDEFINED_OBJECT = "42704"
_UNIQUE_VIOLATION = "23505"

Revoke = Callable[[int], Awaitable[None]]


def _sqlstate(e: BaseException) -> str | None:
    return getattr(getattr(e, "orig", None), "sqlstate", None)


async def _is_prepared(conn: AsyncConnection, gid: str) -> bool:
    row = (await conn.execute(text("SELECT 1 FROM pg_prepared_xacts WHERE gid = :gid"), {"gid": gid})).first()
    return row is not None


async def _recorded(conn: AsyncConnection, gid: str) -> str | None:
    return (await conn.execute(text("SELECT state FROM participant_tx WHERE gid = :gid"), {"gid": gid})).scalar()


async def _finish_prepared(conn: AsyncConnection, gid: str, verb: str) -> bool:
    """COMMIT or ROLLBACK PREPARED, if it is still prepared; True if it was."""
    if not await _is_prepared(conn, gid):
        return False
    try:
        await conn.execute(text(f"{verb} PREPARED '{gid}'"))
        log.info("%s PREPARED %s", verb, gid)
    except DBAPIError as e:
        if _sqlstate(e) != _UNDEFINED_OBJECT:  # another instance finished it just now
            raise
    return True


class AuthenParticipant:
    """authen's :class:`common.participant.Participant`, over the primary of ``router``;
    ``revoke`` voids a user's tokens (see the module's docstring)."""

    def __init__(self, router: ReadWriteRouter, revoke: Revoke | None = None) -> None:
        self.router = router
        self.revoke = revoke

    async def state_of(self, gid: str) -> str:
        """unknown | prepared | committed | aborted, as the primary sees it."""
        check_gid(gid)
        async with self.router.on_primary() as conn:
            if await _is_prepared(conn, gid):
                return "prepared"
            return await _recorded(conn, gid) or "unknown"

    async def prepare(self, gid: str, user_id: int, after_prepare: Callable[[], None] | None = None) -> str:
        """Vote yes (returns "prepared") or no (raises Conflict/NotFound)."""
        check_gid(gid)
        async with self.router.on_primary() as conn:
            if await _is_prepared(conn, gid):
                return "prepared"
            recorded = await _recorded(conn, gid)
            await conn.rollback()
            if recorded == "committed":
                return "committed"
            if recorded == "aborted":
                raise Conflict(f"transaction {gid} was already aborted here")
            try:
                async with conn.begin():
                    # Do not queue behind another transaction holding this user: vote no instead.
                    await conn.execute(text("SET LOCAL lock_timeout = '2s'"))
                    found = (
                        await conn.execute(text("SELECT id FROM users WHERE id = :id FOR UPDATE"), {"id": user_id})
                    ).first()
                    if found is None:
                        raise NotFound(f"no user with id {user_id}")
                    await conn.execute(text("DELETE FROM users WHERE id = :id"), {"id": user_id})
                    await conn.execute(
                        text("INSERT INTO participant_tx (gid, user_id, state) VALUES (:gid, :id, 'committed')"),
                        {"gid": gid, "id": user_id},
                    )
                    await conn.execute(text(f"PREPARE TRANSACTION '{gid}'"))
                if after_prepare is not None:
                    after_prepare()
            except DBAPIError as e:
                if _sqlstate(e) == _LOCK_NOT_AVAILABLE:
                    # Perhaps our own earlier attempt prepared it meanwhile (a retried call).
                    async with self.router.on_primary() as check:
                        if await _is_prepared(check, gid):
                            return "prepared"
                    raise Conflict(f"user {user_id} is locked by another transaction") from e
                if _sqlstate(e) == _UNIQUE_VIOLATION:
                    # An abort of this gid committed its record while we prepared: it stands.
                    raise Conflict(f"transaction {gid} was already aborted here") from e
                raise
        log.info("prepared %s (delete user %d)", gid, user_id)
        return "prepared"

    async def commit(self, gid: str) -> str:
        check_gid(gid)
        async with self.router.on_primary() as conn:
            await conn.execution_options(isolation_level="AUTOCOMMIT")
            if await _finish_prepared(conn, gid, "COMMIT"):
                # Reads on any instance must not see the user any more, replicas included.
                await self.router.mark_written(conn)
            recorded = await _recorded(conn, gid)
            user_id = (
                (await conn.execute(text("SELECT user_id FROM participant_tx WHERE gid = :gid"), {"gid": gid})).scalar()
                if recorded == "committed"
                else None
            )
        if recorded == "committed":
            # Every time it is asked (idempotent): a retry after a failed revocation repeats it.
            if self.revoke is not None and user_id is not None:
                await self.revoke(int(user_id))
            return "committed"
        if recorded == "aborted":
            raise Conflict(f"transaction {gid} was aborted here; it cannot commit")
        raise Conflict(f"transaction {gid} was never prepared here")

    async def abort(self, gid: str, attempts: int = 10) -> str:
        check_gid(gid)
        for _ in range(attempts):
            async with self.router.on_primary() as conn:
                await conn.execution_options(isolation_level="AUTOCOMMIT")
                await _finish_prepared(conn, gid, "ROLLBACK")
                try:
                    # A prepare still running holds this gid's row: wait briefly, then look again.
                    # (SET LOCAL: the pooled connection must not keep the timeout.)
                    await conn.execute(text("BEGIN"))
                    await conn.execute(text("SET LOCAL lock_timeout = '1s'"))
                    await conn.execute(
                        text(
                            "INSERT INTO participant_tx (gid, state) VALUES (:gid, 'aborted') "
                            "ON CONFLICT (gid) DO NOTHING"
                        ),
                        {"gid": gid},
                    )
                    await conn.execute(text("COMMIT"))
                except DBAPIError as e:
                    await conn.execute(text("ROLLBACK"))
                    if _sqlstate(e) == _LOCK_NOT_AVAILABLE:
                        continue
                    raise
                recorded = await _recorded(conn, gid)
            if recorded == "committed":
                raise Conflict(f"transaction {gid} was committed here; it cannot abort")
            return "aborted"
        raise Conflict(f"transaction {gid} is busy; try the abort again")

    async def prepared(self) -> list[dict[str, Any]]:
        async with self.router.on_primary() as conn:
            rows = (
                await conn.execute(
                    text(
                        "SELECT gid, prepared FROM pg_prepared_xacts WHERE database = current_database() ORDER BY prepared"
                    )
                )
            ).all()
        return [{"gid": r[0], "prepared_at": r[1].isoformat()} for r in rows]

    # -- saga steps ---------------------------------------------------------------------------
    async def set_active(self, user_id: int, active: bool) -> dict[str, Any]:
        async def run(conn: AsyncConnection) -> Any:
            return (
                await conn.execute(
                    text("UPDATE users SET is_active = :a WHERE id = :id RETURNING id"), {"a": active, "id": user_id}
                )
            ).first()

        if await self.router.write(run) is None:
            raise NotFound(f"no user with id {user_id}")
        # A reactivated user signs in again: tokens from before the deactivation stay void.
        if not active and self.revoke is not None:
            await self.revoke(user_id)
        return {"user_id": user_id, "is_active": active}

    async def delete_user(self, user_id: int) -> dict[str, Any]:
        async def run(conn: AsyncConnection) -> Any:
            return (await conn.execute(text("DELETE FROM users WHERE id = :id RETURNING id"), {"id": user_id})).first()

        deleted = await self.router.write(run)
        if self.revoke is not None:
            await self.revoke(user_id)
        return {"user_id": user_id, "deleted": deleted is not None}

    async def stale_prepared(self, older_than_s: float) -> list[str]:
        async with self.router.on_primary() as conn:
            rows = (
                await conn.execute(
                    text(
                        "SELECT gid FROM pg_prepared_xacts WHERE database = current_database() AND gid LIKE :prefix "
                        "AND prepared < now() - make_interval(secs => :after)"
                    ),
                    {"after": older_than_s, "prefix": GID_PREFIX + "%"},
                )
            ).all()
        return [r[0] for r in rows]
