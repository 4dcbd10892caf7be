"""ETL speed: raw MongoDB read rate vs a full refresh, a no-op run and 10,000 new messages.

Against a running local stack (``make up``, or ``PORT_OFFSET=N STACK_DIR=... python -m stack up``)::

    python bench/etl.py [--offset 0] [--stack-dir .stack] [--scale 1.0]

Generates, directly into the databases (bulk inserts, not the API), ``scale`` times
1,000 barbers and 20,000 customers (authen's users table), 50,000 chats and 1,000,000
messages over 90 days (chat's MongoDB), then measures in one go:

1. the source limit: every message read from MongoDB with the same driver, query,
   projection and batch size as the ETL, and nothing else;
2. ``python -m etl run --full-refresh``: time, rows/s and the peak RSS of the process;
3. ``python -m etl run`` with nothing new;
4. ``python -m etl run`` after 10,000 new messages.

Run times are the run's own (its record's started_at → finished_at), with the process's
wall time (interpreter and pandas start-up included) beside them. Goals: full refresh
within 2x the raw read, RSS under 1 GiB, no-op under 1 s, 10,000 new under 5 s.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import os
import random
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import psycopg  # noqa: E402
from pymongo import ASCENDING, AsyncMongoClient  # noqa: E402

from etl.extract import MESSAGE_FIELDS  # noqa: E402
from stack.layout import Layout, service_env  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
DAY = 86400.0


def insert_users(layout: Layout, kind: str, n: int, prefix: str) -> list[int]:
    buf = io.StringIO()
    for i in range(n):
        buf.write(f"{prefix}_{kind[:4]}_{i}\tx\tFirst{i}\tLast{i}\t{kind}\n")
    with psycopg.connect(layout.pg_dsn("authen"), autocommit=True) as conn:
        with conn.cursor() as cur:
            with cur.copy("COPY users (username, password_hash, first_name, last_name, type) FROM STDIN") as copy:
                copy.write(buf.getvalue())
        rows = conn.execute(
            "SELECT id FROM users WHERE username LIKE %s ORDER BY id", (f"{prefix}\\_{kind[:4]}\\_%",)
        ).fetchall()
    return [r[0] for r in rows]


async def generate(layout: Layout, db: str, scale: float, seed: int = 1) -> dict[str, Any]:
    rnd = random.Random(seed)
    prefix = f"b{uuid.uuid4().hex[:6]}"
    t0 = time.monotonic()
    barbers = insert_users(layout, "employee", int(1000 * scale), prefix)
    customers = insert_users(layout, "customer", int(20_000 * scale), prefix)
    n_chats, n_messages = int(50_000 * scale), int(1_000_000 * scale)
    end = time.time() - 600
    start = end - 90 * DAY
    client: AsyncMongoClient = AsyncMongoClient(layout.mongo_url)
    chats: list[dict[str, Any]] = []
    pairs: set[tuple[int, int]] = set()
    while len(chats) < n_chats:
        pair = (rnd.choice(customers), rnd.choice(barbers))
        if pair not in pairs:
            pairs.add(pair)
            chats.append(
                {
                    "_id": f"{prefix}-{len(chats)}",
                    "customer_id": pair[0],
                    "employee_id": pair[1],
                    "created_at": rnd.uniform(start, end - DAY),
                    "deleting": None,
                }
            )
    coll = client[db]
    for i in range(0, len(chats), 10_000):
        await coll.chats.insert_many(chats[i : i + 10_000], ordered=False)
    # Messages per chat: n_messages spread evenly, each chat's in time order from its start.
    per_chat = [n_messages // n_chats + (1 if i < n_messages % n_chats else 0) for i in range(n_chats)]
    state: dict[str, tuple[int, float]] = {}
    batch: list[dict[str, Any]] = []
    written = 0
    for chat, n in zip(chats, per_chat):
        t = chat["created_at"]
        step = (end - t) / (n + 1)
        for seq in range(1, n + 1):
            t += rnd.uniform(0.2, 1.8) * step
            sender = chat["employee_id"] if rnd.random() < 0.4 else chat["customer_id"]
            batch.append(
                {
                    "_id": f"{chat['_id']}:{seq}",
                    "chat_id": chat["_id"],
                    "seq": seq,
                    "sender": {"id": sender, "first_name": "F", "last_name": "L"},
                    "message": "hello there",
                    "sent_at": "",
                    "created_at": min(t, end),
                }
            )
            if len(batch) >= 10_000:
                await coll.messages.insert_many(batch, ordered=False)
                written += len(batch)
                batch = []
                print(f"\r  generated {written:,} messages", end="", file=sys.stderr, flush=True)
        state[chat["_id"]] = (n, chat["employee_id"])
    if batch:
        await coll.messages.insert_many(batch, ordered=False)
        written += len(batch)
    print(file=sys.stderr)
    await client.close()
    return {
        "barbers": len(barbers),
        "customers": len(customers),
        "chats": len(chats),
        "messages": written,
        "seconds": time.monotonic() - t0,
        "state": state,
        "chat_customers": {c["_id"]: c["customer_id"] for c in chats},
    }


async def raw_read(layout: Layout, db: str, batch: int) -> tuple[int, float]:
    """The ETL's own query (range on created_at, same projection and batch size), nothing else."""
    client: AsyncMongoClient = AsyncMongoClient(layout.mongo_url)
    await client[db].messages.create_index([("created_at", ASCENDING)], name="etl_created_at")
    t0 = time.monotonic()
    n = 0
    async for _ in (
        client[db]
        .messages.find({"created_at": {"$gt": 0.0}}, MESSAGE_FIELDS)
        .sort("created_at", ASCENDING)
        .batch_size(batch)
    ):
        n += 1
    elapsed = time.monotonic() - t0
    await client.close()
    return n, elapsed


def run_etl(layout: Layout, db: str, *args: str) -> dict[str, Any]:
    env = {**os.environ, **service_env(layout), "CHAT_MONGO_DB": db}
    while True:
        t0 = time.monotonic()
        proc = subprocess.Popen(
            [sys.executable, "-m", "etl", "run", *args],
            cwd=ROOT,
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        assert proc.stderr is not None
        err = proc.stderr.read()
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
        wall = time.monotonic() - t0
        if proc.returncode == 3:  # the stack's own scheduled run holds the lock: try again
            time.sleep(1)
            continue
        if proc.returncode != 0:
            raise SystemExit(f"etl run {args} failed:\n{err.decode(errors='replace')[-2000:]}")
        break
    with psycopg.connect(layout.pg_dsn("warehouse"), autocommit=True) as conn:
        run_id, seconds, rows = conn.execute(
            "SELECT run_id, extract(epoch FROM finished_at - started_at)::float8, rows FROM etl_runs "
            "WHERE state = 'succeeded' ORDER BY run_id DESC LIMIT 1"
        ).fetchone()
    return {"run_id": run_id, "run_s": seconds, "wall_s": wall, "rows": rows, "max_rss_mib": usage.ru_maxrss / 1024}


async def add_messages(layout: Layout, db: str, gen: dict[str, Any], n: int) -> None:
    rnd = random.Random(7)
    client: AsyncMongoClient = AsyncMongoClient(layout.mongo_url)
    state = gen["state"]
    chat_ids = list(state)
    now = time.time()
    docs = []
    for i in range(n):
        cid = rnd.choice(chat_ids)
        seq, barber = state[cid]
        seq += 1
        state[cid] = (seq, barber)
        sender = barber if rnd.random() < 0.4 else gen["chat_customers"][cid]
        docs.append(
            {
                "_id": f"{cid}:{seq}",
                "chat_id": cid,
                "seq": seq,
                "sender": {"id": sender},
                "message": "new",
                "sent_at": "",
                "created_at": now + i * 1e-3,
            }
        )
    await client[db].messages.insert_many(docs, ordered=False)
    await client.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--offset", type=int, default=int(os.environ.get("PORT_OFFSET", 0)))
    parser.add_argument("--stack-dir", default=os.environ.get("STACK_DIR", ".stack"))
    parser.add_argument("--scale", type=float, default=1.0, help="fraction of the full data set")
    parser.add_argument("--mongo-db", default="chat", help="the MongoDB database (the ETL's CHAT_MONGO_DB)")
    args = parser.parse_args()
    layout = Layout(Path(args.stack_dir).resolve(), args.offset)

    print(f"generating (scale {args.scale}) ...", file=sys.stderr)
    gen = asyncio.run(generate(layout, args.mongo_db, args.scale))
    print(
        f"generated {gen['barbers']:,} barbers, {gen['customers']:,} customers, {gen['chats']:,} chats, "
        f"{gen['messages']:,} messages in {gen['seconds']:.0f} s"
    )
    total, read_s = asyncio.run(raw_read(layout, args.mongo_db, 20_000))
    print(f"raw read: {total:,} messages in {read_s:.2f} s ({total / read_s:,.0f}/s)")
    full = run_etl(layout, args.mongo_db, "--full-refresh")
    print(
        f"full refresh: {full['run_s']:.2f} s ({total / full['run_s']:,.0f} messages/s; "
        f"{full['run_s'] / read_s:.2f}x the raw read), process {full['wall_s']:.2f} s, "
        f"peak RSS {full['max_rss_mib']:.0f} MiB, rows {full['rows']}"
    )
    noop = run_etl(layout, args.mongo_db)
    print(f"no-op incremental: {noop['run_s']:.3f} s (process {noop['wall_s']:.2f} s), rows {noop['rows']}")
    asyncio.run(add_messages(layout, args.mongo_db, gen, 10_000))
    new = run_etl(layout, args.mongo_db)
    print(
        f"10,000 new messages: {new['run_s']:.3f} s (process {new['wall_s']:.2f} s), "
        f"peak RSS {new['max_rss_mib']:.0f} MiB, rows {new['rows']}"
    )


if __name__ == "__main__":
    main()
