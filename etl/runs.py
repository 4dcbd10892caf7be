"""Run records and the one-run-at-a-time lock, in the warehouse.

The lock is a session-level PostgreSQL advisory lock held by the run's own connection:
it spans every etl instance and every ``python -m etl run``, and it is released by the
server when that connection ends, so a killed run never leaves it held.
"""

from __future__ import annotations

import json
from datetime import datetime
from typing import Any

from psycopg import AsyncConnection
from psycopg.rows import dict_row
from psycopg.types.json import Jsonb

from common.errors import Conflict

RUN_LOCK = 7_212_300

RUN_COLUMNS = "run_id, mode, state, started_at, finished_at, rows, watermarks, error, elasticsearch"


class RunInProgress(Conflict):
    def __init__(self) -> None:
        super().__init__("an ETL run is in progress")


async def try_lock(conn: AsyncConnection) -> bool:
    row = await (await conn.execute("SELECT pg_try_advisory_lock(%s)", (RUN_LOCK,))).fetchone()
    return bool(row and row[0])


async def start(conn: AsyncConnection, mode: str, instance: str) -> int:
    """Record a new run (committed at once, so it is visible while it runs). Runs left
    'running' by a process that died are closed first: we hold the lock, so none is live."""
    async with conn.transaction():
        await conn.execute(
            "UPDATE etl_runs SET state = 'failed', finished_at = now(), "
            "error = 'interrupted: the process running it stopped before it finished' WHERE state = 'running'"
        )
        row = await (
            await conn.execute(
                "INSERT INTO etl_runs (mode, state, instance) VALUES (%s, 'running', %s) RETURNING run_id",
                (mode, instance),
            )
        ).fetchone()
    assert row is not None
    return int(row[0])


async def succeed(conn: AsyncConnection, run_id: int, rows: dict[str, int], marks: dict[str, Any]) -> None:
    """Inside the load's transaction: the record says succeeded exactly when the rows are in."""
    await conn.execute(
        "UPDATE etl_runs SET state = 'succeeded', finished_at = clock_timestamp(), rows = %s, watermarks = %s WHERE run_id = %s",
        (Jsonb(rows), Jsonb(marks), run_id),
    )


async def fail(conn: AsyncConnection, run_id: int, rows: dict[str, int], error: str) -> None:
    await conn.execute(
        "UPDATE etl_runs SET state = 'failed', finished_at = clock_timestamp(), rows = %s, error = %s WHERE run_id = %s",
        (Jsonb(rows), error, run_id),
    )


async def set_elasticsearch(conn: AsyncConnection, run_id: int, indexed: int, error: str | None) -> None:
    await conn.execute(
        "UPDATE etl_runs SET elasticsearch = %s WHERE run_id = %s",
        (Jsonb({"indexed": indexed, "error": error}), run_id),
    )


def _public(row: dict[str, Any]) -> dict[str, Any]:
    out = dict(row)
    for key in ("started_at", "finished_at"):
        value = out.get(key)
        if isinstance(value, datetime):
            out[key] = value.isoformat()
    for key in ("rows", "watermarks", "elasticsearch"):
        if isinstance(out.get(key), str):
            out[key] = json.loads(out[key])
    return out


async def get(conn: AsyncConnection, run_id: int) -> dict[str, Any] | None:
    async with conn.cursor(row_factory=dict_row) as cur:
        await cur.execute(f"SELECT {RUN_COLUMNS} FROM etl_runs WHERE run_id = %s", (run_id,))
        row = await cur.fetchone()
    return _public(row) if row else None


async def recent(conn: AsyncConnection, limit: int, offset: int) -> list[dict[str, Any]]:
    async with conn.cursor(row_factory=dict_row) as cur:
        await cur.execute(
            f"SELECT {RUN_COLUMNS} FROM etl_runs ORDER BY run_id DESC LIMIT %s OFFSET %s", (limit, offset)
        )
        return [_public(r) for r in await cur.fetchall()]
