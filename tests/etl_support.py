"""Helpers (no tests) for the etl tests: running the ETL, reading the analytics, generating
history straight into the databases, and an independent reference computation.

The reference is written from the metric definitions in docs/etl.md with plain Python
over the raw MongoDB documents (no pandas, no SQL), so it shares no code with etl/.
"""

from __future__ import annotations

import math
import os
import subprocess
import sys
import time
import uuid
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from typing import Any

import psycopg
from pymongo import AsyncMongoClient

from stack.layout import Layout
from tests.http import call
from tests.stackproc import ROOT, StackProcess
from tests.util import wait_until

METRICS = (
    "chats_started",
    "new_customers",
    "returning_customers",
    "customer_messages",
    "barber_messages",
    "replies",
    "reply_time_median_s",
    "reply_time_p90_s",
    "unanswered_chats",
)
FLOATS = ("reply_time_median_s", "reply_time_p90_s")


def gw(stack: StackProcess) -> str:
    return stack.url("gateway")


# -- running the ETL -----------------------------------------------------------------------
async def wait_run(stack: StackProcess, token: str, run_id: int, timeout: float = 120) -> dict:
    async def finished() -> dict | None:
        reply = await call("GET", f"{gw(stack)}/etl/runs/{run_id}", token=token)
        assert reply.code == 200, reply
        return reply.json if reply.json["state"] != "running" else None

    return await wait_until(finished, timeout=timeout, interval=0.2, message=f"run {run_id} finished")


async def start_run(stack: StackProcess, token: str, full: bool = False, timeout: float = 120) -> int:
    """POST /etl/runs, waiting out a run already in progress (the schedule's, say)."""

    async def started() -> int | None:
        reply = await call("POST", f"{gw(stack)}/etl/runs" + ("?full_refresh=1" if full else ""), token=token)
        if reply.code == 409:
            return None
        assert reply.code == 202, reply
        assert reply.headers["Location"] == f"/etl/runs/{reply.json['run_id']}"
        return reply.json["run_id"]

    return await wait_until(started, timeout=timeout, interval=0.2, message="a run started")


async def run_etl(stack: StackProcess, token: str, full: bool = False) -> dict:
    run = await wait_run(stack, token, await start_run(stack, token, full))
    assert run["state"] == "succeeded", run
    return run


def etl_command(stack: StackProcess, *args: str, env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
    """``python -m etl <args>`` with the stack's environment."""
    full_env = {**os.environ, **stack.env, **(env or {})}
    log = open(stack.layout.logs_dir / f"test-etl-cli-{uuid.uuid4().hex[:6]}.log", "ab")
    return subprocess.Popen(
        [sys.executable, "-m", "etl", *args],
        cwd=ROOT,
        env=full_env,
        stdout=log,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
    )


# -- reading the analytics -----------------------------------------------------------------
async def leaderboard(stack: StackProcess, token: str, start: date, end: date, **query: Any) -> dict:
    q = "&".join([f"from={start}", f"to={end}", "limit=1000"] + [f"{k}={v}" for k, v in query.items()])
    reply = await call("GET", f"{gw(stack)}/etl/analytics/barbers?{q}", token=token)
    assert reply.code == 200, reply
    return reply.json


async def rows_of(
    stack: StackProcess, token: str, barber_ids: Iterable[int], start: date, end: date
) -> dict[int, dict]:
    wanted = set(barber_ids)
    return {
        r["barber_id"]: r for r in (await leaderboard(stack, token, start, end))["barbers"] if r["barber_id"] in wanted
    }


async def daily(stack: StackProcess, token: str, barber_id: int, start: date, end: date) -> Any:
    return await call("GET", f"{gw(stack)}/etl/analytics/barbers/{barber_id}/daily?from={start}&to={end}", token=token)


async def snapshot(stack: StackProcess, token: str, barber_ids: list[int], start: date, end: date) -> dict:
    """Everything the API says about these barbers over the range."""
    out: dict[str, Any] = {"period": await rows_of(stack, token, barber_ids, start, end)}
    for b in barber_ids:
        reply = await daily(stack, token, b, start, end)
        out[b] = reply.json["days"] if reply.code == 200 else reply.code
    return out


def warehouse(stack: StackProcess) -> psycopg.Connection:
    return psycopg.connect(stack.layout.pg_dsn("warehouse"), autocommit=True)


def watermarks(stack: StackProcess) -> dict:
    with warehouse(stack) as conn:
        return dict(conn.execute("SELECT name, value FROM etl_state").fetchall())


# -- the reference computation -------------------------------------------------------------
def percentile(values: list[float], p: float) -> float | None:
    """Linear interpolation between closest ranks (what percentile_cont does)."""
    if not values:
        return None
    v = sorted(values)
    pos = p * (len(v) - 1)
    lo, hi = math.floor(pos), math.ceil(pos)
    return v[lo] + (v[hi] - v[lo]) * (pos - lo)


def utc_day(ts: float) -> date:
    return datetime.fromtimestamp(ts, UTC).date()


@dataclass
class Reference:
    """chats: {chat_id: {customer_id, employee_id, created_at}}; messages: raw documents."""

    chats: dict[str, dict]
    messages: list[dict]

    def _customer_messages(self) -> list[tuple[str, int, float, float | None]]:
        """(chat_id, barber, sent, reply time or None) for every customer message."""
        by_chat: dict[str, list[dict]] = defaultdict(list)
        for m in self.messages:
            by_chat[m["chat_id"]].append(m)
        out = []
        for chat_id, msgs in by_chat.items():
            chat = self.chats[chat_id]
            msgs.sort(key=lambda m: m["seq"])
            for i, m in enumerate(msgs):
                if m["sender"]["id"] == chat["employee_id"]:
                    continue
                reply = next((r["created_at"] for r in msgs[i + 1 :] if r["sender"]["id"] == chat["employee_id"]), None)
                out.append((chat_id, chat["employee_id"], m["created_at"], reply))
        return out

    def period(self, barber: int, start: date, end: date) -> dict[str, Any]:
        chats = {cid: c for cid, c in self.chats.items() if c["employee_id"] == barber}
        started = sum(1 for c in chats.values() if start <= utc_day(c["created_at"]) <= end)
        mine = [m for m in self.messages if m["chat_id"] in chats and start <= utc_day(m["created_at"]) <= end]
        barber_msgs = sum(1 for m in mine if m["sender"]["id"] == barber)
        cust = [x for x in self._customer_messages() if x[1] == barber]
        in_period = [x for x in cust if start <= utc_day(x[2]) <= end]
        waits = [x[3] - x[2] for x in cust if x[3] is not None and start <= utc_day(x[3]) <= end]
        returning = {x[0] for x in in_period if utc_day(chats[x[0]]["created_at"]) < start}
        unanswered = {x[0] for x in in_period if x[3] is None or utc_day(x[3]) > end}
        return {
            "chats_started": started,
            "new_customers": started,
            "returning_customers": len(returning),
            "customer_messages": len(in_period),
            "barber_messages": barber_msgs,
            "replies": len(waits),
            "reply_time_median_s": percentile(waits, 0.5),
            "reply_time_p90_s": percentile(waits, 0.9),
            "unanswered_chats": len(unanswered),
        }

    def days(self, barber: int, start: date, end: date) -> list[dict[str, Any]]:
        out = []
        day = start
        while day <= end:
            out.append({"day": day.isoformat(), **self.period(barber, day, day)})
            day += timedelta(days=1)
        return out


def assert_metrics(actual: dict, expected: dict, where: str) -> None:
    for key in METRICS:
        a, e = actual[key], expected[key]
        if key in FLOATS and a is not None and e is not None:
            assert abs(a - e) < 1e-3, f"{where} {key}: {a} != {e}"
        else:
            assert a == e, f"{where} {key}: {a} != {e} (row {actual})"


async def check_against_reference(
    stack: StackProcess, token: str, ref: Reference, barbers: list[int], start: date, end: date
) -> None:
    rows = await rows_of(stack, token, barbers, start, end)
    for b in barbers:
        assert b in rows, f"barber {b} missing from the leaderboard"
        assert_metrics(rows[b], ref.period(b, start, end), f"barber {b} period")
        reply = await daily(stack, token, b, start, end)
        assert reply.code == 200, reply
        expected_days = ref.days(b, start, end)
        assert [d["day"] for d in reply.json["days"]] == [d["day"] for d in expected_days]
        for got, want in zip(reply.json["days"], expected_days):
            assert_metrics(got, want, f"barber {b} day {want['day']}")


async def load_reference(stack: StackProcess, chat_ids: Iterable[str]) -> Reference:
    """The raw documents of these chats, as the ETL's sources hold them now."""
    client: AsyncMongoClient = AsyncMongoClient(stack.env["MONGO_URL"])
    try:
        ids = sorted(set(chat_ids))
        chats = {c["_id"]: c async for c in client.chat.chats.find({"_id": {"$in": ids}})}
        messages = [m async for m in client.chat.messages.find({"chat_id": {"$in": ids}})]
    finally:
        await client.close()
    return Reference(chats, [m for m in messages if m["chat_id"] in chats])


# -- generating history straight into the databases ----------------------------------------
def insert_users(layout: Layout, kind: str, n: int, prefix: str) -> list[int]:
    with psycopg.connect(layout.pg_dsn("authen"), autocommit=True) as conn:
        rows = conn.execute(
            "INSERT INTO users (username, password_hash, first_name, last_name, type) "
            "SELECT %s || g, 'x', 'First' || g, 'Last' || g, %s FROM generate_series(1, %s) g RETURNING id",
            (f"{prefix}_{kind[:4]}_", kind, n),
        ).fetchall()
    return [r[0] for r in rows]


@dataclass
class Generated:
    barbers: list[int]
    customers: list[int]
    chats: dict[str, dict]


def plan_history(
    barbers: list[int],
    customers: list[int],
    chats_n: int,
    messages_n: int,
    days: int,
    seed: int,
    end_ts: float | None = None,
) -> tuple[dict[str, dict], list[dict]]:
    """Chats and messages spread over ``days`` days before ``end_ts``: random but seeded, with
    answered and unanswered customer messages and replies that cross midnight."""
    import random

    rnd = random.Random(seed)
    end_ts = end_ts or time.time() - 60
    start_ts = end_ts - days * 86400
    pairs = set()
    chats: dict[str, dict] = {}
    while len(chats) < chats_n:
        pair = (rnd.choice(customers), rnd.choice(barbers))
        if pair in pairs:
            continue
        pairs.add(pair)
        cid = f"gen{seed}-{uuid.uuid4().hex[:20]}"
        chats[cid] = {
            "_id": cid,
            "customer_id": pair[0],
            "employee_id": pair[1],
            "created_at": rnd.uniform(start_ts, end_ts - 3600),
            "deleting": None,
        }
    ids = list(chats)
    clock = {cid: chats[cid]["created_at"] for cid in ids}
    seq = dict.fromkeys(ids, 0)
    messages = []
    for _ in range(messages_n):
        cid = rnd.choice(ids)
        chat = chats[cid]
        clock[cid] = min(end_ts, clock[cid] + rnd.expovariate(1 / 5000))
        seq[cid] += 1
        sender = chat["employee_id"] if rnd.random() < 0.4 else chat["customer_id"]
        messages.append(
            {
                "_id": f"{cid}-{seq[cid]}",
                "chat_id": cid,
                "seq": seq[cid],
                "sender": {"id": sender, "first_name": "F", "last_name": "L"},
                "message": "hi",
                "sent_at": "",
                "created_at": clock[cid],
            }
        )
    return chats, messages


async def insert_mongo(stack: StackProcess, db: str, chats: list[dict], messages: list[dict]) -> None:
    client: AsyncMongoClient = AsyncMongoClient(stack.env["MONGO_URL"])
    try:
        if chats:
            await client[db].chats.insert_many(chats)
        for i in range(0, len(messages), 5000):
            await client[db].messages.insert_many(messages[i : i + 5000])
    finally:
        await client.close()
