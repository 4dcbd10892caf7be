"""One ETL run: extract → transform → load in one warehouse transaction.

Exactly once: the new watermarks, the loaded rows and the run record's "succeeded" are
committed together, so a run that dies anywhere leaves the warehouse and the marks as
they were and the next run redoes the same work. Loads are upserts keyed by the source's
own keys (user id, chat id, (chat, seq)), so redoing work never counts anything twice.

Incremental: chats and messages are read by ``created_at`` after the last run's mark,
minus ``ETL_LATE_WINDOW_S``: a chat instance stores messages in batches, so one can land
with a timestamp below a mark already committed. Re-read messages already loaded are
recognised by (chat, seq) and left alone.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
import psycopg
from psycopg import AsyncConnection

from common.errors import DependencyUnavailable
from etl import load, metrics, runs, search
from etl.extract import ChatSource, SourceUnavailable, UserSource
from etl.settings import EtlSettings
from etl.transform import Skipped, attach_chats, chats_frame, compute_replies, messages_frame
from replicas import ReadWriteRouter

log = logging.getLogger("barber.etl")

Progress = Callable[[str, int], None]

PHASES = ("extracted", "transformed", "loaded", "skipped")


class WarehouseUnavailable(DependencyUnavailable):
    dependency = "warehouse"


class RunFailed(Exception):
    def __init__(self, run_id: int, error: str) -> None:
        super().__init__(error)
        self.run_id = run_id
        self.error = error


@dataclass
class Context:
    """What a run needs; built once per process (etl.app / etl.__main__)."""

    settings: EtlSettings
    chat: ChatSource
    users: UserSource
    warehouse: ReadWriteRouter
    instance: str


@dataclass
class Run:
    """A run that holds the lock and has its record; :func:`execute` carries it out."""

    conn: AsyncConnection
    run_id: int
    full_refresh: bool
    rows: dict[str, int] = field(default_factory=lambda: dict.fromkeys(PHASES, 0))

    @property
    def mode(self) -> str:
        return "full" if self.full_refresh else "incremental"


async def connect_warehouse(ctx: Context) -> AsyncConnection:
    try:
        return await psycopg.AsyncConnection.connect(
            ctx.warehouse.primary.dsn,
            autocommit=True,
            connect_timeout=max(2, int(ctx.settings.etl_db_connect_timeout_s)),
        )
    except psycopg.OperationalError as e:
        raise WarehouseUnavailable(f"the warehouse primary is unavailable: {_one_line(e)}") from e


def run_fields(run: Run, state: str, elapsed_s: float, **more: Any) -> dict[str, Any]:
    """ECS `extra=` of a finished run (mapped in elk/templates.py; the Kibana ETL dashboard)."""
    return {
        "event.action": "etl-run",
        "event.duration": int(elapsed_s * 1e9),
        "barber.etl.run_id": run.run_id,
        "barber.etl.mode": run.mode,
        "barber.etl.state": state,
        **{f"barber.etl.rows.{phase}": n for phase, n in run.rows.items()},
        **more,
    }


async def begin(ctx: Context, *, full_refresh: bool) -> Run:
    """Take the run lock and record the run; :class:`runs.RunInProgress` if another holds it."""
    conn = await connect_warehouse(ctx)
    try:
        if not await runs.try_lock(conn):
            raise runs.RunInProgress()
        run_id = await runs.start(conn, "full" if full_refresh else "incremental", ctx.instance)
    except BaseException:
        await conn.close()
        raise
    log.info(
        "run %d started (%s)",
        run_id,
        "full refresh" if full_refresh else "incremental",
        extra={
            "barber.etl.run_id": run_id,
            "event.action": "etl-run-start",
            "barber.etl.state": "running",
            "barber.etl.mode": "full" if full_refresh else "incremental",
        },
    )
    return Run(conn, run_id, full_refresh)


def _one_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def _describe(e: BaseException) -> str:
    if isinstance(e, SourceUnavailable):
        return str(e)
    if isinstance(e, psycopg.OperationalError):
        return f"the warehouse primary is unavailable: {_one_line(e)}"
    if isinstance(e, DependencyUnavailable):
        return e.detail
    return f"{type(e).__name__}: {_one_line(e)}"


def _crash(settings: EtlSettings, point: str) -> None:
    """Test hook: die here as a ``kill -9`` would (no cleanup, no rollback by us)."""
    if settings.barber_test_hooks and settings.etl_crash_at == point:
        log.warning("test hook: killing this process at %s", point)
        os.kill(os.getpid(), signal.SIGKILL)


async def _pause(settings: EtlSettings) -> None:
    """Test hook: hold the lock while the pause file exists."""
    if settings.barber_test_hooks and settings.etl_pause_file:
        while Path(settings.etl_pause_file).exists():
            await asyncio.sleep(0.05)


async def execute(ctx: Context, run: Run, progress: Progress | None = None) -> dict[str, Any]:
    """Carry the run out and release the lock; the run record, or :class:`RunFailed`."""
    report = progress or (lambda phase, n: None)
    started = time.monotonic()
    try:
        try:
            await _pause(ctx.settings)
            await ctx.chat.ensure_indexes()
            async with run.conn.transaction():
                await _work(ctx, run, report)
                _crash(ctx.settings, "before_commit")
        except Exception as e:
            error = _describe(e)
            log.error(
                "run %d failed: %s",
                run.run_id,
                error,
                extra=run_fields(run, "failed", time.monotonic() - started, **{"error.type": type(e).__name__}),
            )
            await _record_failure(ctx, run, error)
            metrics.RUNS.labels("failed").inc()
            raise RunFailed(run.run_id, error) from e
        await _publish_position(ctx, run.conn)
        elapsed = time.monotonic() - started
        metrics.RUNS.labels("succeeded").inc()
        metrics.RUN_SECONDS.observe(elapsed)
        metrics.LAST_SUCCESS.set_to_current_time()
        for phase, n in run.rows.items():
            metrics.ROWS.labels(phase).inc(n)
        log.info(
            "run %d succeeded in %.2fs: %s", run.run_id, elapsed, run.rows, extra=run_fields(run, "succeeded", elapsed)
        )
        indexed, es_error = await search.index_pending(ctx.settings, run.conn, run.run_id, run.full_refresh)
        try:
            await runs.set_elasticsearch(run.conn, run.run_id, indexed, es_error)
        except psycopg.Error as e:
            log.warning("run %d: could not record the Elasticsearch outcome: %s", run.run_id, _one_line(e))
        record = await runs.get(run.conn, run.run_id)
        assert record is not None
        return record
    finally:
        await run.conn.close()


async def _record_failure(ctx: Context, run: Run, error: str) -> None:
    """Best effort: on the run's connection, else a new one; if the warehouse is gone the
    record stays 'running' and the next run closes it as interrupted."""
    for attempt in range(2):
        try:
            conn = run.conn if attempt == 0 and not run.conn.closed else await connect_warehouse(ctx)
            try:
                await runs.fail(conn, run.run_id, run.rows, error)
            finally:
                if conn is not run.conn:
                    await conn.close()
            return
        except (psycopg.Error, DependencyUnavailable) as e:
            log.warning("run %d: could not record its failure (%s)", run.run_id, _one_line(e))


async def _publish_position(ctx: Context, conn: AsyncConnection) -> None:
    """The commit's WAL position becomes the warehouse's high-water mark, so the analytics
    API (any instance) reads only from replicas that have replayed this run."""
    try:
        row = await (await conn.execute("SELECT (pg_current_wal_lsn() - '0/0'::pg_lsn)::bigint")).fetchone()
    except psycopg.Error as e:
        log.warning("could not read the warehouse WAL position: %s", _one_line(e))
        return
    if row is not None:
        await ctx.warehouse.hwm.publish(int(row[0]))


async def _work(ctx: Context, run: Run, report: Progress) -> None:
    s = ctx.settings
    conn = run.conn
    rows = run.rows
    skipped = Skipped()

    def count(phase: str, n: int) -> None:
        rows[phase] += n
        report(phase, rows[phase])

    await load.begin(conn, full_refresh=run.full_refresh)
    marks = await load.watermarks(conn)

    # Users: new ones in, deleted ones forgotten (a deletion only once the primary confirms it).
    authen_ids = await ctx.users.ids()
    new_ids = sorted(authen_ids - await load.dim_user_ids(conn))
    users = await ctx.users.rows(new_ids)
    count("extracted", len(users))
    count("transformed", len(users))
    count("loaded", await load.upsert_users(conn, users))
    gone = sorted(await load.known_user_ids(conn) - authen_ids)
    if gone:
        try:
            still_there = await ctx.users.existing_on_primary(gone)
        except DependencyUnavailable:
            log.warning("authen primary unavailable: %d possible deletions wait for the next run", len(gone))
            still_there = set(gone)
        deleted = [i for i in gone if i not in still_there]
        if deleted:
            forgotten = await load.forget_users(conn, deleted)
            log.info("forgot %d deleted users (%s)", len(deleted), forgotten)

    # Chats.
    chat_mark = float(marks.get("chats_created_at", 0.0))
    new_chat_mark = chat_mark
    async for batch in ctx.chat.chats_after(max(0.0, chat_mark - s.etl_late_window_s), s.etl_chunk_rows):
        count("extracted", len(batch))
        frame = chats_frame(batch, skipped)
        count("transformed", len(frame))
        count("loaded", await load.upsert_chats(conn, frame))
        if not frame.empty:
            new_chat_mark = max(new_chat_mark, float(frame["created_at"].max()))

    # Messages, chunk by chunk.
    msg_mark = float(marks.get("messages_created_at", 0.0))
    new_msg_mark = msg_mark
    chunks = 0
    async for batch in ctx.chat.messages_after(max(0.0, msg_mark - s.etl_late_window_s), s.etl_chunk_rows):
        count("extracted", len(batch))
        frame = messages_frame(batch, skipped)
        if frame.empty:
            continue
        new_msg_mark = max(new_msg_mark, float(frame["created_at"].max()))
        chat_ids = frame["chat_id"].unique().tolist()
        keys = await load.chat_keys(conn, chat_ids)
        missing = sorted(set(chat_ids) - set(keys["chat_id"]))
        if missing:  # chats newer than the chat pass (or below its window): fetch them now
            await load.upsert_chats(conn, chats_frame(await ctx.chat.chats_by_id(missing), skipped))
            keys = await load.chat_keys(conn, chat_ids)
        msgs = attach_chats(frame, keys, skipped)
        msgs = msgs.drop_duplicates(["chat_key", "seq"])
        reread = msgs[msgs["sent_us"] <= round(msg_mark * 1e6)]
        if not reread.empty:
            stored = await load.already_loaded(conn, reread)
            if stored:
                fresh = [(k, q) not in stored for k, q in zip(msgs["chat_key"], msgs["seq"])]
                msgs = msgs[fresh]
        count("transformed", len(msgs))
        if msgs.empty:
            continue
        work = compute_replies(pd.concat([await load.working_set(conn, msgs), msgs], ignore_index=True))
        await load.upsert_messages(conn, work)
        count("loaded", len(msgs))
        chunks += 1
        if chunks == 1:
            _crash(s, "mid_load")

    days = await load.finish(conn, run.run_id)
    rows["skipped"] = len(skipped)
    report("skipped", rows["skipped"])
    new_marks = {"messages_created_at": new_msg_mark, "chats_created_at": new_chat_mark}
    await load.save_watermarks(conn, new_marks)
    log.info("run %d recomputed %d barber-days", run.run_id, days, extra={"barber.etl.run_id": run.run_id})
    await runs.succeed(conn, run.run_id, rows, new_marks)
