"""The coordinator log (PostgreSQL ``coordinator``): every state change, written before
the message that depends on it."""

from __future__ import annotations

import contextlib
import json
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from sqlalchemy import text
from sqlalchemy.exc import IntegrityError, InterfaceError, OperationalError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, create_async_engine

from common.errors import Conflict, ServiceUnavailable
from common.participant import GID_PREFIX


def gid_of(tx_id: uuid.UUID) -> str:
    """The global transaction id participants know it by (PREPARE TRANSACTION '<gid>')."""
    return f"{GID_PREFIX}{tx_id}"


def tx_of(gid: str) -> uuid.UUID | None:
    if not gid.startswith(GID_PREFIX):
        return None
    try:
        return uuid.UUID(gid[len(GID_PREFIX) :])
    except ValueError:
        return None


@dataclass
class Transaction:
    id: uuid.UUID
    kind: str
    mode: str
    user_id: int
    state: str
    decision: str | None
    completed: bool
    detail: str | None
    owner: str
    created_at: datetime
    updated_at: datetime
    finished_at: datetime | None
    participants: dict[str, dict[str, Any]] = field(default_factory=dict)
    steps: list[dict[str, Any]] = field(default_factory=list)

    @property
    def gid(self) -> str:
        return gid_of(self.id)

    def to_json(self) -> dict[str, Any]:
        body: dict[str, Any] = {
            "transaction_id": str(self.id),
            "kind": self.kind,
            "mode": self.mode,
            "user_id": self.user_id,
            "state": self.state,
            "completed": self.completed,
            "detail": self.detail,
            "created_at": self.created_at.isoformat(),
            "updated_at": self.updated_at.isoformat(),
            "finished_at": self.finished_at.isoformat() if self.finished_at else None,
        }
        if self.mode == "2pc":
            body["decision"] = self.decision
            body["participants"] = self.participants
        else:
            body["steps"] = self.steps
        return body


_TX_COLUMNS = "id, kind, mode, user_id, state, decision, completed, detail, owner, created_at, updated_at, finished_at"


class LogUnavailable(ServiceUnavailable):
    """The coordinator's log database is down: 503. What was already logged stays;
    recovery finishes it once the log is back."""


def already_running(user_id: int) -> Conflict:
    return Conflict(f"a deletion of user {user_id} is already running")


class TxLog:
    def __init__(self, database_url: str, lease_s: float) -> None:
        self.engine: AsyncEngine = create_async_engine(
            database_url,
            pool_size=5,
            max_overflow=10,
            pool_pre_ping=True,
            connect_args={"connect_timeout": 3},
        )
        self.lease_s = lease_s

    async def close(self) -> None:
        await self.engine.dispose()

    @contextlib.asynccontextmanager
    async def _connect(self, *, transaction: bool) -> AsyncIterator[AsyncConnection]:
        """A connection (in a transaction that commits on exit, if asked); the database
        being unreachable becomes :class:`LogUnavailable`."""
        try:
            async with self.engine.begin() if transaction else self.engine.connect() as conn:
                yield conn
        except (OperationalError, InterfaceError, OSError) as e:
            raise LogUnavailable("the coordinator's log is unavailable; try again shortly") from e

    # -- writing ---------------------------------------------------------------------
    async def begin(
        self, tx_id: uuid.UUID, mode: str, user_id: int, owner: str, participants: list[str], steps: list[str]
    ) -> None:
        try:
            async with self._connect(transaction=True) as conn:
                await conn.execute(
                    text(
                        "INSERT INTO transactions (id, kind, mode, user_id, state, owner, lease_until) "
                        "VALUES (:id, 'delete_user', :mode, :user_id, 'running', :owner, "
                        "now() + make_interval(secs => :lease))"
                    ),
                    {"id": tx_id, "mode": mode, "user_id": user_id, "owner": owner, "lease": self.lease_s},
                )
                for name in participants:
                    await conn.execute(
                        text("INSERT INTO tx_participants (tx_id, name, state) VALUES (:id, :name, 'pending')"),
                        {"id": tx_id, "name": name},
                    )
                for position, name in enumerate(steps):
                    await conn.execute(
                        text(
                            "INSERT INTO saga_steps (tx_id, position, name, state) VALUES (:id, :p, :name, 'pending')"
                        ),
                        {"id": tx_id, "p": position, "name": name},
                    )
        except IntegrityError as e:
            raise already_running(user_id) from e

    async def unfinished_for(self, user_id: int) -> uuid.UUID | None:
        async with self._connect(transaction=False) as conn:
            return (
                await conn.execute(
                    text("SELECT id FROM transactions WHERE user_id = :u AND NOT completed LIMIT 1"), {"u": user_id}
                )
            ).scalar()

    async def set_participant(self, tx_id: uuid.UUID, name: str, state: str, detail: str | None = None) -> None:
        async with self._connect(transaction=True) as conn:
            await conn.execute(
                text(
                    "UPDATE tx_participants SET state = :state, detail = :detail, updated_at = now() "
                    "WHERE tx_id = :id AND name = :name"
                ),
                {"id": tx_id, "name": name, "state": state, "detail": detail},
            )
            await self._touch(conn, tx_id)

    async def decide(self, tx_id: uuid.UUID, decision: str, detail: str | None = None) -> str:
        """Record the decision once; returns the decision in force (an earlier one wins)."""
        state = "committed" if decision == "commit" else "aborted"
        async with self._connect(transaction=True) as conn:
            row = (
                await conn.execute(
                    text(
                        "UPDATE transactions SET decision = :d, state = :s, detail = coalesce(:detail, detail), "
                        "updated_at = now(), lease_until = now() + make_interval(secs => :lease) "
                        "WHERE id = :id AND decision IS NULL RETURNING decision"
                    ),
                    {"id": tx_id, "d": decision, "s": state, "detail": detail, "lease": self.lease_s},
                )
            ).first()
            if row is not None:
                return row[0]
            return (
                await conn.execute(text("SELECT decision FROM transactions WHERE id = :id"), {"id": tx_id})
            ).scalar_one()

    async def complete(self, tx_id: uuid.UUID) -> None:
        async with self._connect(transaction=True) as conn:
            await conn.execute(
                text(
                    "UPDATE transactions SET completed = true, finished_at = now(), updated_at = now() WHERE id = :id"
                ),
                {"id": tx_id},
            )

    async def set_step(
        self, tx_id: uuid.UUID, position: int, state: str, progress: dict[str, Any] | None = None, attempt: bool = False
    ) -> None:
        async with self._connect(transaction=True) as conn:
            await conn.execute(
                text(
                    "UPDATE saga_steps SET state = :state, progress = coalesce(CAST(:progress AS jsonb), progress), "
                    "attempts = attempts + :inc, updated_at = now() WHERE tx_id = :id AND position = :p"
                ),
                {
                    "id": tx_id,
                    "p": position,
                    "state": state,
                    "progress": json.dumps(progress) if progress is not None else None,
                    "inc": int(attempt),
                },
            )
            await self._touch(conn, tx_id)

    async def _touch(self, conn: Any, tx_id: uuid.UUID) -> None:
        await conn.execute(
            text(
                "UPDATE transactions SET updated_at = now(), lease_until = now() + make_interval(secs => :lease) "
                "WHERE id = :id"
            ),
            {"id": tx_id, "lease": self.lease_s},
        )

    async def renew(self, tx_id: uuid.UUID) -> None:
        async with self._connect(transaction=True) as conn:
            await self._touch(conn, tx_id)

    async def claim_unfinished(self, owner: str, exclude: set[uuid.UUID]) -> list[uuid.UUID]:
        """Take over unfinished transactions whose lease ran out, and our own."""
        async with self._connect(transaction=True) as conn:
            rows = (
                await conn.execute(
                    text(
                        "UPDATE transactions SET owner = :owner, lease_until = now() + make_interval(secs => :lease) "
                        "WHERE NOT completed AND (lease_until < now() OR owner = :owner) "
                        "RETURNING id"
                    ),
                    {"owner": owner, "lease": self.lease_s},
                )
            ).all()
        return [r[0] for r in rows if r[0] not in exclude]

    # -- reading ---------------------------------------------------------------------
    async def get(self, tx_id: uuid.UUID) -> Transaction | None:
        async with self._connect(transaction=False) as conn:
            row = (
                (await conn.execute(text(f"SELECT {_TX_COLUMNS} FROM transactions WHERE id = :id"), {"id": tx_id}))
                .mappings()
                .first()
            )
            if row is None:
                return None
            tx = Transaction(**row)
            for p in (
                await conn.execute(
                    text("SELECT name, state, detail, updated_at FROM tx_participants WHERE tx_id = :id ORDER BY name"),
                    {"id": tx_id},
                )
            ).mappings():
                tx.participants[p["name"]] = {
                    "state": p["state"],
                    "detail": p["detail"],
                    "updated_at": p["updated_at"].isoformat(),
                }
            for s in (
                await conn.execute(
                    text(
                        "SELECT position, name, state, progress, attempts, updated_at FROM saga_steps "
                        "WHERE tx_id = :id ORDER BY position"
                    ),
                    {"id": tx_id},
                )
            ).mappings():
                tx.steps.append(
                    {
                        "position": s["position"],
                        "name": s["name"],
                        "state": s["state"],
                        "progress": s["progress"],
                        "attempts": s["attempts"],
                        "updated_at": s["updated_at"].isoformat(),
                    }
                )
            return tx

    async def list(self, state: str | None, user_id: int | None, limit: int) -> list[Transaction]:
        clauses: list[str] = []
        params: dict[str, Any] = {"limit": limit}
        if state:
            clauses.append("state = :state")
            params["state"] = state
        if user_id is not None:
            clauses.append("user_id = :user_id")
            params["user_id"] = user_id
        where = f"WHERE {' AND '.join(clauses)}" if clauses else ""
        async with self._connect(transaction=False) as conn:
            ids = [
                r[0]
                for r in await conn.execute(
                    text(f"SELECT id FROM transactions {where} ORDER BY created_at DESC LIMIT :limit"), params
                )
            ]
        return [tx for tx in [await self.get(i) for i in ids] if tx is not None]
