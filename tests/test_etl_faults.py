"""The ETL under faults: a run killed mid-load, sources and the warehouse primary down,
the authen replicas down, two runs at once; and a full refresh against the incremental
runs over generated history.

Generated history runs in an isolated pipeline (its own MongoDB database and warehouse
database on the same servers, through the real `python -m etl`), so its watermarks start
at zero and the history can be loaded slice by slice in time order.
"""

from __future__ import annotations

import asyncio
import uuid
from datetime import date, timedelta
from pathlib import Path

import psycopg
import pytest

from etl.analytics import Period
from etl.analytics import leaderboard as period_rows
from replicas import ReadWriteRouter
from tests.etl_support import (
    METRICS,
    Reference,
    assert_metrics,
    etl_command,
    gw,
    insert_mongo,
    insert_users,
    plan_history,
    run_etl,
    start_run,
    utc_day,
    wait_run,
    warehouse,
)
from tests.http import call
from tests.procs import start_service
from tests.stackproc import StackProcess
from tests.test_chat_support import make_user
from tests.util import wait_until

pytestmark = pytest.mark.timeout(900)

# The facts as a comparable value: natural keys only (chat_key and run_id differ by run).
DIGEST_SQL = {
    "dim_user": "SELECT user_id, type, username, first_name, last_name FROM dim_user ORDER BY 1",
    "fact_chat": "SELECT chat_id, barber_id, customer_id, started_at, first_customer_message_at, "
    "first_barber_reply_at, message_count, last_message_at FROM fact_chat ORDER BY chat_id",
    "fact_message": "SELECT c.chat_id, m.seq, m.barber_id, m.sender_role, m.sent_at, m.reply_seq, m.reply_at, "
    "round(m.reply_s::numeric, 3) FROM fact_message m JOIN fact_chat c USING (chat_key) ORDER BY 1, 2",
    "fact_barber_day": "SELECT barber_id, day, chats_started, new_customers, returning_customers, customer_messages, "
    "barber_messages, replies, round(reply_time_median_s::numeric, 3), "
    "round(reply_time_p90_s::numeric, 3), unanswered_chats FROM fact_barber_day ORDER BY 1, 2",
    "etl_state": "SELECT name, value::text FROM etl_state ORDER BY 1",
}


def digest(dsn: str, tables: tuple[str, ...] = tuple(DIGEST_SQL)) -> dict[str, list]:
    with psycopg.connect(dsn, autocommit=True) as conn:
        return {t: conn.execute(DIGEST_SQL[t]).fetchall() for t in tables}


class Pipeline:
    """An isolated warehouse database and MongoDB database, run by the real CLI."""

    def __init__(self, stack: StackProcess, mongo_db: str) -> None:
        self.stack = stack
        self.db = f"wh_{uuid.uuid4().hex[:10]}"
        self.mongo_db = mongo_db
        layout = stack.layout
        self.env = {
            "WAREHOUSE_DATABASE_URL": layout.pg_url(self.db),
            "WAREHOUSE_REPLICA_URLS": ",".join(layout.pg_url(self.db, i) for i in (1, 2)),
            "CHAT_MONGO_DB": mongo_db,
        }

    @property
    def dsn(self) -> str:
        return self.stack.layout.pg_dsn(self.db)

    async def create(self) -> Pipeline:
        with psycopg.connect(self.stack.layout.pg_dsn("postgres"), autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{self.db}"')
        assert await self.cli("migrate") == 0
        return self

    async def cli(self, *args: str, env: dict[str, str] | None = None, timeout: float = 300) -> int:
        proc = etl_command(self.stack, *args, env={**self.env, **(env or {})})
        await wait_until(lambda: proc.poll() is not None, timeout=timeout, interval=0.1, message=f"etl {args}")
        return proc.returncode

    async def run(self, *args: str, env: dict[str, str] | None = None) -> None:
        assert await self.cli("run", *args, env=env) == 0

    def drop(self) -> None:
        with psycopg.connect(self.stack.layout.pg_dsn("postgres"), autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{self.db}" WITH (FORCE)')

    def runs(self) -> list[tuple]:
        with psycopg.connect(self.dsn, autocommit=True) as conn:
            return conn.execute("SELECT run_id, mode, state, error FROM etl_runs ORDER BY run_id").fetchall()


async def generated(
    stack: StackProcess, *, barbers: int, customers: int, chats: int, messages: int, days: int, seed: int
) -> tuple[list[int], dict[str, dict], list[dict]]:
    prefix = f"g{uuid.uuid4().hex[:8]}"
    barber_ids = insert_users(stack.layout, "employee", barbers, prefix)
    customer_ids = insert_users(stack.layout, "customer", customers, prefix)
    chat_docs, message_docs = plan_history(barber_ids, customer_ids, chats, messages, days, seed)
    return barber_ids, chat_docs, message_docs


def slices(chats: dict[str, dict], messages: list[dict], n: int) -> list[tuple[list[dict], list[dict]]]:
    """The history cut into ``n`` consecutive time slices (as it would arrive)."""
    times = sorted([c["created_at"] for c in chats.values()] + [m["created_at"] for m in messages])
    cuts = [times[len(times) * (i + 1) // n - 1] for i in range(n)]
    out, lo = [], float("-inf")
    for hi in cuts:
        out.append(
            (
                [c for c in chats.values() if lo < c["created_at"] <= hi],
                [m for m in messages if lo < m["created_at"] <= hi],
            )
        )
        lo = hi
    return out


async def check_pipeline(pipe: Pipeline, ref: Reference, barbers: list[int], start: date, end: date) -> None:
    """The isolated warehouse's daily rows and period figures against the reference."""
    with psycopg.connect(pipe.dsn, autocommit=True) as conn:
        rows = conn.execute(
            "SELECT barber_id, day, chats_started, new_customers, returning_customers, customer_messages, "
            "barber_messages, replies, reply_time_median_s, reply_time_p90_s, unanswered_chats "
            "FROM fact_barber_day WHERE barber_id = ANY(%s)",
            (barbers,),
        ).fetchall()
    stored = {(r[0], r[1]): dict(zip(METRICS, r[2:])) for r in rows}
    empty = {
        "chats_started": 0,
        "new_customers": 0,
        "returning_customers": 0,
        "customer_messages": 0,
        "barber_messages": 0,
        "replies": 0,
        "reply_time_median_s": None,
        "reply_time_p90_s": None,
        "unanswered_chats": 0,
    }
    for b in barbers:
        for want in ref.days(b, start, end):
            got = stored.get((b, date.fromisoformat(want["day"])), empty)
            assert_metrics(got, want, f"barber {b} day {want['day']}")
    router = ReadWriteRouter(pipe.env["WAREHOUSE_DATABASE_URL"], pipe.env["WAREHOUSE_REPLICA_URLS"])
    try:
        board = await period_rows(router, Period(start, end), "barber_id", "asc", 1000, 0)
    finally:
        await router.close()
    by_id = {r["barber_id"]: r for r in board["barbers"]}
    for b in barbers:
        assert_metrics(by_id[b], ref.period(b, start, end), f"barber {b} period")


async def test_full_refresh_equals_incremental_runs(stack: StackProcess) -> None:
    mongo_db = f"chat_{uuid.uuid4().hex[:8]}"
    barbers, chats, messages = await generated(
        stack, barbers=6, customers=60, chats=120, messages=3000, days=8, seed=11
    )
    pipe = await Pipeline(stack, mongo_db).create()
    try:
        for chat_slice, message_slice in slices(chats, messages, 4):
            await insert_mongo(stack, mongo_db, chat_slice, message_slice)
            await pipe.run()
        incremental = digest(pipe.dsn)
        assert len(incremental["fact_message"]) == 3000
        await pipe.run("--full-refresh")
        full = digest(pipe.dsn)
        for table in ("fact_chat", "fact_message", "fact_barber_day"):
            assert full[table] == incremental[table], table
        ref = Reference(chats, messages)
        end = max(utc_day(m["created_at"]) for m in messages)
        start = end - timedelta(days=9)
        await check_pipeline(pipe, ref, barbers, start, end)
        # A period's median is exact over its replies (not a median of daily medians).
        await check_pipeline(pipe, ref, barbers, start + timedelta(days=3), end - timedelta(days=2))
    finally:
        pipe.drop()


async def test_kill_mid_load_then_rerun_equals_uninterrupted(stack: StackProcess) -> None:
    mongo_db = f"chat_{uuid.uuid4().hex[:8]}"
    _barbers, chats, messages = await generated(stack, barbers=3, customers=20, chats=30, messages=800, days=4, seed=5)
    (c1, m1), (c2, m2) = slices(chats, messages, 2)
    killed = await Pipeline(stack, mongo_db).create()
    clean = await Pipeline(stack, mongo_db).create()
    try:
        await insert_mongo(stack, mongo_db, c1, m1)
        await killed.run()
        before = digest(killed.dsn)
        await insert_mongo(stack, mongo_db, c2, m2)
        # Several chunks, killed (SIGKILL) once the first is loaded.
        code = await killed.cli(
            "run", env={"BARBER_TEST_HOOKS": "1", "ETL_CRASH_AT": "mid_load", "ETL_CHUNK_ROWS": "100"}
        )
        assert code == -9
        assert digest(killed.dsn) == before
        assert killed.runs()[-1][2] == "running"
        await killed.run()
        assert killed.runs()[-2][2:] == ("failed", "interrupted: the process running it stopped before it finished")
        # Killed just before the commit: the same.
        after = digest(killed.dsn)
        last = max(m["created_at"] for m in m2)
        await insert_mongo(
            stack,
            mongo_db,
            [],
            [
                dict(m, _id=m["_id"] + "x", seq=m["seq"] + 10_000, created_at=last + 1 + i)
                for i, m in enumerate(m2[-20:])
            ],
        )
        assert await killed.cli("run", env={"BARBER_TEST_HOOKS": "1", "ETL_CRASH_AT": "before_commit"}) == -9
        assert digest(killed.dsn) == after
        await killed.run()
        await clean.run()
        assert digest(killed.dsn, ("fact_chat", "fact_message", "fact_barber_day")) == digest(
            clean.dsn, ("fact_chat", "fact_message", "fact_barber_day")
        )
    finally:
        killed.drop()
        clean.drop()


async def test_source_down_leaves_warehouse_unchanged_and_the_schedule_retries(
    stack: StackProcess, admin_token: str
) -> None:
    await run_etl(stack, admin_token)
    customer = await make_user(stack, "customer", "While", "Down")
    before = digest(stack.layout.pg_dsn("warehouse"))
    await asyncio.to_thread(stack.control.stop, "mongo")
    scheduled = None
    try:
        run_id = await start_run(stack, admin_token)
        run = await wait_run(stack, admin_token, run_id)
        assert run["state"] == "failed" and "MongoDB" in run["error"], run
        assert run["finished_at"] is not None
        assert digest(stack.layout.pg_dsn("warehouse")) == before
        # An instance with a short schedule fails, retries by itself with backoff...
        scheduled = await start_service(stack, "etl", extra_env={"ETL_INTERVAL_S": "2", "ETL_RETRY_MIN_S": "0.3"})

        async def failed_runs() -> int:
            reply = await call("GET", f"{gw(stack)}/etl/runs?limit=50", token=admin_token)
            return sum(1 for r in reply.json["runs"] if r["run_id"] > run_id and r["state"] == "failed") >= 2

        await wait_until(failed_runs, timeout=60, interval=0.3, message="scheduled retries")
        assert digest(stack.layout.pg_dsn("warehouse")) == before
    finally:
        await asyncio.to_thread(stack.control.start, "mongo")
    try:
        # ... and succeeds once MongoDB is back, with no one asking.
        async def recovered() -> bool:
            reply = await call("GET", f"{gw(stack)}/etl/runs?limit=5", token=admin_token)
            return any(r["run_id"] > run_id and r["state"] == "succeeded" for r in reply.json["runs"])

        await wait_until(recovered, timeout=90, interval=0.3, message="a scheduled run succeeded")
        with warehouse(stack) as conn:
            assert conn.execute("SELECT count(*) FROM dim_user WHERE user_id = %s", (customer.id,)).fetchone()[0] == 1
    finally:
        if scheduled is not None:
            await scheduled.stop()


async def test_warehouse_primary_down(stack: StackProcess, admin_token: str) -> None:
    await run_etl(stack, admin_token)
    before = digest(stack.layout.pg_dsn("warehouse"))
    await asyncio.to_thread(stack.control.stop, "postgres-primary")
    try:
        proc = etl_command(stack, "run")
        await wait_until(lambda: proc.poll() is not None, timeout=60, message="etl run exits")
        assert proc.returncode == 1
        reply = await call("POST", f"{gw(stack)}/etl/runs", token=admin_token)
        assert reply.code == 503 and reply.json["detail"], reply
    finally:
        await asyncio.to_thread(stack.control.start, "postgres-primary")
    assert digest(stack.layout.pg_dsn("warehouse")) == before
    await wait_until(lambda: run_etl(stack, admin_token), timeout=90, interval=1, message="a run after recovery")


async def test_authen_replicas_down_reads_elsewhere(stack: StackProcess, admin_token: str) -> None:
    await asyncio.to_thread(stack.control.stop, "postgres-replica-1")
    try:
        one = await make_user(stack, "employee", "One", "Replica")
        await run_etl(stack, admin_token)
        await asyncio.to_thread(stack.control.stop, "postgres-replica-2")
        try:
            none = await make_user(stack, "employee", "No", "Replica")
            await run_etl(stack, admin_token)
        finally:
            await asyncio.to_thread(stack.control.start, "postgres-replica-2")
    finally:
        await asyncio.to_thread(stack.control.start, "postgres-replica-1")
    with warehouse(stack) as conn:
        found = {
            r[0]
            for r in conn.execute(
                "SELECT user_id FROM dim_user WHERE user_id IN (%s, %s)", (one.id, none.id)
            ).fetchall()
        }
    assert found == {one.id, none.id}


async def test_one_run_at_a_time(stack: StackProcess, admin_token: str, tmp_path: Path) -> None:
    await run_etl(stack, admin_token)
    pause = tmp_path / "hold"
    pause.write_text("")
    holder = etl_command(stack, "run", env={"BARBER_TEST_HOOKS": "1", "ETL_PAUSE_FILE": str(pause)})
    try:

        async def held() -> dict | None:
            reply = await call("GET", f"{gw(stack)}/etl/runs?limit=1", token=admin_token)
            top = reply.json["runs"][0]
            return top if top["state"] == "running" else None

        running = await wait_until(held, timeout=60, interval=0.2, message="the held run")
        reply = await call("POST", f"{gw(stack)}/etl/runs", token=admin_token)
        assert reply.code == 409 and reply.json["detail"], reply
        other = etl_command(stack, "run")
        await wait_until(lambda: other.poll() is not None, timeout=60, message="the second run exits")
        assert other.returncode == 3
        assert (await held()) == running
    finally:
        pause.unlink(missing_ok=True)
    await wait_until(lambda: holder.poll() is not None, timeout=60, message="the held run exits")
    assert holder.returncode == 0
    assert (await wait_run(stack, admin_token, running["run_id"]))["state"] == "succeeded"
