"""Deletion benchmark: 2PC deletions/s and latency, and one large saga.

    .venv/bin/python -m bench.deletion --start-stack            # its own stack (offset 6000)
    .venv/bin/python -m bench.deletion                          # a running `make up` stack
                                                                # (BARBER_ADMIN_PASSWORD set)

Setup (not measured): users with CHATS chats of MESSAGES messages each. Chats are started
through chat's API; the messages are written straight into MongoDB in chat's document
format, since sending 100,000 messages through sockets would measure chat, not deletion.
Measured: DELETE /admin/users/<id> (2PC) one at a time and CONCURRENCY at a time, then a
saga for one user with SAGA_MESSAGES messages, timed until its transaction completes.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import time
import uuid
from pathlib import Path
from typing import Any

from pymongo import AsyncMongoClient
from tornado.httpclient import AsyncHTTPClient

from stack.layout import Layout, service_env

PASSWORD = "bench password"


async def call(method: str, url: str, body: Any = None, token: str | None = None) -> tuple[int, Any]:
    headers = {"Content-Type": "application/json"}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    resp = await AsyncHTTPClient().fetch(
        url,
        method=method,
        headers=headers,
        raise_error=False,
        body=json.dumps(body) if body is not None else (b"" if method == "POST" else None),
        request_timeout=120,
        allow_nonstandard_methods=True,
    )
    return resp.code, json.loads(resp.body) if resp.body else None


async def user(gw: str, kind: str) -> dict:
    name = f"b{kind[:3]}_{uuid.uuid4().hex[:10]}"
    code, body = await call(
        "POST",
        f"{gw}/authen/authen/signup",
        {"username": name, "password": PASSWORD, "first_name": "B", "last_name": "M", "type": kind},
    )
    assert code == 201, body
    code, body = await call("POST", f"{gw}/authen/authen/signin", {"username": name, "password": PASSWORD})
    assert code == 200, body
    return body


async def party(gw: str, mongo: AsyncMongoClient, chats: int, messages: int, employees: list[dict]) -> int:
    customer = await user(gw, "customer")
    for employee in employees[:chats]:
        code, body = await call(
            "POST", f"{gw}/chat/chats/start?employee_id={employee['user_id']}", token=customer["token"]
        )
        assert code in (200, 201), body
        chat_id = body["chat_id"]
        now = time.time()
        docs = [
            {
                "_id": f"{chat_id}:{s}",
                "chat_id": chat_id,
                "seq": s,
                "sender": {"id": customer["user_id"], "first_name": "B", "last_name": "M"},
                "message": f"message {s}",
                "sent_at": "2026-11-29T00:00:00Z",
                "created_at": now,
            }
            for s in range(1, messages + 1)
        ]
        for i in range(0, len(docs), 5000):
            await mongo.chat.messages.insert_many(docs[i : i + 5000], ordered=False)
    return customer["user_id"]


def pct(values: list[float], p: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, round(p / 100 * (len(values) - 1)))]


async def run(
    layout: Layout, admin_password: str, users: int, chats: int, messages: int, concurrency: int, saga_messages: int
) -> None:
    env = service_env(layout)
    gw = layout.gateway_url
    mongo: AsyncMongoClient = AsyncMongoClient(env["MONGO_URL"])
    code, body = await call("POST", f"{gw}/authen/authen/signin", {"username": "admin", "password": admin_password})
    assert code == 200, f"admin sign-in failed ({code}): set BARBER_ADMIN_PASSWORD for the stack"
    admin = body["token"]
    employees = [await user(gw, "employee") for _ in range(max(chats, 1))]

    print(f"setup: {users} users x {chats} chats x {messages} messages ...", flush=True)
    ids = [await party(gw, mongo, chats, messages, employees) for _ in range(users)]

    async def delete(uid: int, mode: str = "2pc") -> float:
        t0 = time.perf_counter()
        code, body = await call("DELETE", f"{gw}/admin/users/{uid}?mode={mode}", token=admin)
        assert code in (200, 202) and body["state"] in ("committed", "running"), (code, body)
        return time.perf_counter() - t0

    half = len(ids) // 2
    t0 = time.perf_counter()
    sequential = [await delete(uid) for uid in ids[:half]]
    seq_elapsed = time.perf_counter() - t0
    sem = asyncio.Semaphore(concurrency)

    async def limited(uid: int) -> float:
        async with sem:
            return await delete(uid)

    t0 = time.perf_counter()
    concurrent = await asyncio.gather(*(limited(uid) for uid in ids[half:]))
    conc_elapsed = time.perf_counter() - t0
    for label, lat, elapsed in (
        ("2pc sequential", sequential, seq_elapsed),
        (f"2pc concurrency {concurrency}", concurrent, conc_elapsed),
    ):
        ms = [x * 1000 for x in lat]
        print(
            f"{label:<22} {len(lat) / elapsed:7.1f} deletions/s   p50 {statistics.median(ms):7.1f} ms   "
            f"p99 {pct(ms, 99):7.1f} ms   ({len(lat)} users, {chats} chats x {messages} messages each)"
        )

    if saga_messages:
        uid = await party(gw, mongo, 1, saga_messages, employees)
        t0 = time.perf_counter()
        code, body = await call("DELETE", f"{gw}/admin/users/{uid}?mode=saga", token=admin)
        assert code == 202, body
        tx_url = f"{gw}/admin/transactions/{body['transaction_id']}"
        while True:
            code, tx = await call("GET", tx_url, token=admin)
            if tx["completed"]:
                break
            await asyncio.sleep(0.2)
        elapsed = time.perf_counter() - t0
        purge = next(s for s in tx["steps"] if s["name"] == "purge_chats")["progress"]
        print(
            f"saga: {saga_messages} messages deleted in {elapsed:.2f} s ({purge.get('batches')} batches, "
            f"{saga_messages / elapsed:.0f} messages/s), state {tx['state']}"
        )
    await mongo.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--start-stack", action="store_true", help="start a stack of its own")
    parser.add_argument("--offset", type=int, default=6000)
    parser.add_argument("--users", type=int, default=40)
    parser.add_argument("--chats", type=int, default=10)
    parser.add_argument("--messages", type=int, default=100)
    parser.add_argument("--concurrency", type=int, default=4)
    parser.add_argument("--saga-messages", type=int, default=100_000)
    args = parser.parse_args()
    if args.start_stack:
        from tests.stackproc import ADMIN_PASSWORD, StackProcess

        proc = StackProcess(args.offset)
        proc.start()
        try:
            asyncio.run(
                run(
                    proc.layout,
                    ADMIN_PASSWORD,
                    args.users,
                    args.chats,
                    args.messages,
                    args.concurrency,
                    args.saga_messages,
                )
            )
        finally:
            proc.stop()
            proc.remove()
    else:
        layout = Layout(Path(os.environ.get("STACK_DIR", ".stack")), int(os.environ.get("PORT_OFFSET", 0)))
        asyncio.run(
            run(
                layout,
                os.environ.get("BARBER_ADMIN_PASSWORD", ""),
                args.users,
                args.chats,
                args.messages,
                args.concurrency,
                args.saga_messages,
            )
        )


if __name__ == "__main__":
    main()
