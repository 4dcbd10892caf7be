"""The ETL and its API against the real stack: the numbers, incremental runs, late data,
bad source rows, deleted users, the API's errors and access rules."""

from __future__ import annotations

import time
from datetime import UTC, date, datetime, timedelta

import pytest
from pymongo import AsyncMongoClient

from tests.etl_support import (
    check_against_reference,
    daily,
    gw,
    leaderboard,
    load_reference,
    rows_of,
    run_etl,
    snapshot,
    warehouse,
    watermarks,
)
from tests.http import call
from tests.stackproc import StackProcess
from tests.test_chat_support import ChatClient, ChatUser, make_user, socket_url, start_chat
from tests.test_coordinator import delete, wait_finished

pytestmark = pytest.mark.timeout(600)


def today() -> date:
    return datetime.now(UTC).date()


async def converse(stack: StackProcess, chat_id: str, script: list[tuple[ChatUser, str]]) -> None:
    """Send ``script`` in order through the gateway's sockets, each message stored before
    the next is sent, so the order (and so every reply) is known."""
    base = gw(stack)
    clients: dict[int, ChatClient] = {}
    try:
        for user, _ in script:
            if user.id not in clients:
                clients[user.id] = await ChatClient.connect(socket_url(base, chat_id, user.token, via_gateway=True))
        watcher = next(iter(clients.values()))
        have = len(watcher.messages)
        for user, text in script:
            await clients[user.id].send(text)
            have += 1
            await watcher.wait_messages(have)
    finally:
        for c in clients.values():
            await c.close()


async def test_numbers_second_run_and_new_messages(stack: StackProcess, admin_token: str) -> None:
    base = gw(stack)
    b1 = await make_user(stack, "employee", "Bea", "Barber")
    b2 = await make_user(stack, "employee", "Bob", "Barber")
    cs = [await make_user(stack, "customer", f"Cus{i}", "Tomer") for i in range(3)]
    chats = {
        "c0b1": await start_chat(base + "/chat", cs[0], b1),
        "c1b1": await start_chat(base + "/chat", cs[1], b1),
        "c2b2": await start_chat(base + "/chat", cs[2], b2),
        "c0b2": await start_chat(base + "/chat", cs[0], b2),  # a chat with no message
    }
    # Two customer messages answered by one barber message; one left unanswered; a
    # barber who writes first; a chat with no answer at all.
    await converse(
        stack,
        chats["c0b1"],
        [(cs[0], "hi"), (cs[0], "there?"), (b1, "yes"), (cs[0], "3pm?"), (b1, "ok"), (cs[0], "thanks")],
    )
    await converse(stack, chats["c1b1"], [(b1, "welcome"), (cs[1], "hello"), (b1, "hi!")])
    await converse(stack, chats["c2b2"], [(cs[2], "anyone?"), (cs[2], "hello?")])
    await run_etl(stack, admin_token)
    barbers = [b1.id, b2.id]
    start, end = today() - timedelta(days=2), today()
    ref = await load_reference(stack, chats.values())
    await check_against_reference(stack, admin_token, ref, barbers, start, end)
    row = (await rows_of(stack, admin_token, [b1.id], start, end))[b1.id]
    # The known pattern, as plain numbers too: 6 customer messages to b1, 4 answered.
    assert (
        row["customer_messages"],
        row["barber_messages"],
        row["replies"],
        row["unanswered_chats"],
        row["chats_started"],
    ) == (5, 4, 4, 1, 2)
    assert (row["username"], row["first_name"], row["last_name"]) == (b1.username, "Bea", "Barber")

    # A second run changes nothing.
    before = await snapshot(stack, admin_token, barbers, start, end)
    again = await run_etl(stack, admin_token)
    assert again["rows"]["loaded"] == 0, again
    assert await snapshot(stack, admin_token, barbers, start, end) == before

    # New messages are counted by the next run (and only once).
    await converse(stack, chats["c2b2"], [(b2, "sorry, here"), (cs[2], "great")])
    await run_etl(stack, admin_token)
    ref = await load_reference(stack, chats.values())
    await check_against_reference(stack, admin_token, ref, barbers, start, end)
    assert (await rows_of(stack, admin_token, [b2.id], start, end))[b2.id]["replies"] == 2


async def test_late_message_is_counted(stack: StackProcess, admin_token: str) -> None:
    base = gw(stack)
    barber = await make_user(stack, "employee", "Late", "Barber")
    customer = await make_user(stack, "customer", "Late", "Customer")
    other = await make_user(stack, "customer", "Later", "Customer")
    chat_id = await start_chat(base + "/chat", customer, barber)
    other_chat = await start_chat(base + "/chat", other, barber)
    await converse(stack, chat_id, [(customer, "first")])
    await converse(stack, other_chat, [(other, "pushes the watermark")])
    await run_etl(stack, admin_token)
    mark = watermarks(stack)["messages_created_at"]
    client: AsyncMongoClient = AsyncMongoClient(stack.env["MONGO_URL"])
    try:
        first = await client.chat.messages.find_one({"chat_id": {"$eq": chat_id}, "seq": {"$eq": 1}})
        assert first["created_at"] < mark
        # A chat instance's batch lands after the run, stamped before the run's watermark.
        await client.chat.messages.insert_one(
            {
                "_id": f"late-{chat_id}",
                "chat_id": chat_id,
                "seq": 2,
                "message": "late reply",
                "sent_at": "",
                "sender": {"id": barber.id, "first_name": "Late", "last_name": "Barber"},
                "created_at": (first["created_at"] + mark) / 2,
            }
        )
    finally:
        await client.close()
    await run_etl(stack, admin_token)
    start, end = today() - timedelta(days=1), today()
    row = (await rows_of(stack, admin_token, [barber.id], start, end))[barber.id]
    assert (row["barber_messages"], row["replies"], row["unanswered_chats"]) == (1, 1, 1), row
    ref = await load_reference(stack, [chat_id, other_chat])
    await check_against_reference(stack, admin_token, ref, [barber.id], start, end)


async def test_bad_rows_are_skipped_counted_and_logged(stack: StackProcess, admin_token: str) -> None:
    base = gw(stack)
    barber = await make_user(stack, "employee", "Bad", "Rows")
    customer = await make_user(stack, "customer", "Bad", "Rows")
    chat_id = await start_chat(base + "/chat", customer, barber)
    await converse(stack, chat_id, [(customer, "ok message")])
    now = time.time()
    bad = [
        {"_id": f"bad-nosender-{chat_id}", "chat_id": chat_id, "seq": 2, "message": "x", "created_at": now},
        {
            "_id": f"bad-seq-{chat_id}",
            "chat_id": chat_id,
            "seq": "three",
            "message": "x",
            "created_at": now,
            "sender": {"id": customer.id},
        },
        {
            "_id": f"bad-gone-{chat_id}",
            "chat_id": f"gone-{chat_id}",
            "seq": 1,
            "message": "x",
            "created_at": now,
            "sender": {"id": customer.id},
        },
    ]
    client: AsyncMongoClient = AsyncMongoClient(stack.env["MONGO_URL"])
    try:
        await client.chat.messages.insert_many(bad)
    finally:
        await client.close()
    run = await run_etl(stack, admin_token)
    assert run["rows"]["skipped"] >= 3, run
    log = (stack.layout.logs_dir / "etl.log").read_text(errors="replace")
    for doc in bad[:2]:
        assert doc["_id"] in log
    assert f"gone-{chat_id}:1" in log
    start, end = today(), today()
    row = (await rows_of(stack, admin_token, [barber.id], start, end))[barber.id]
    assert row["customer_messages"] == 1, row
    client = AsyncMongoClient(stack.env["MONGO_URL"])
    try:
        await client.chat.messages.delete_many({"_id": {"$in": [d["_id"] for d in bad]}})
    finally:
        await client.close()


async def test_deleted_customer_and_barber(stack: StackProcess, admin_token: str) -> None:
    base = gw(stack)
    barber = await make_user(stack, "employee", "Gone", "Soon")
    kept = await make_user(stack, "employee", "Stays", "Here")
    customer = await make_user(stack, "customer", "Private", "Person")
    c1 = await start_chat(base + "/chat", customer, kept)
    c2 = await start_chat(base + "/chat", customer, barber)
    await converse(stack, c1, [(customer, "hello"), (kept, "hi")])
    await converse(stack, c2, [(customer, "hello"), (barber, "hi")])
    await run_etl(stack, admin_token)
    start, end = today(), today()
    before = (await rows_of(stack, admin_token, [kept.id], start, end))[kept.id]
    with warehouse(stack) as conn:
        assert conn.execute("SELECT count(*) FROM fact_chat WHERE customer_id = %s", (customer.id,)).fetchone()[0] == 2
        assert conn.execute("SELECT count(*) FROM dim_user WHERE user_id = %s", (customer.id,)).fetchone()[0] == 1

    reply = await delete(stack, admin_token, customer.id)
    assert reply.code in (200, 202), reply
    await wait_finished(stack, admin_token, customer.id)
    await run_etl(stack, admin_token)
    with warehouse(stack) as conn:
        assert (
            conn.execute(
                "SELECT count(*) FROM fact_chat WHERE customer_id = %s OR chat_id IN (%s, %s)", (customer.id, c1, c2)
            ).fetchone()[0]
            == 0
        )
        assert (
            conn.execute(
                "SELECT count(*) FROM dim_user WHERE user_id = %s OR username = %s", (customer.id, customer.username)
            ).fetchone()[0]
            == 0
        )
    # The barber's figures still count the deleted customer's messages.
    after = (await rows_of(stack, admin_token, [kept.id], start, end))[kept.id]
    assert after == before

    reply = await delete(stack, admin_token, barber.id)
    assert reply.code in (200, 202), reply
    await wait_finished(stack, admin_token, barber.id)
    await run_etl(stack, admin_token)
    assert barber.id not in await rows_of(stack, admin_token, [barber.id], start, end)
    assert (await daily(stack, admin_token, barber.id, start, end)).code == 404
    with warehouse(stack) as conn:
        for table in ("fact_chat", "fact_message", "fact_barber_day"):
            assert conn.execute(f"SELECT count(*) FROM {table} WHERE barber_id = %s", (barber.id,)).fetchone()[0] == 0


async def test_api_errors_and_access(stack: StackProcess, admin_token: str) -> None:
    base = gw(stack) + "/etl"
    barber = await make_user(stack, "employee", "Own", "Data")
    other = await make_user(stack, "employee", "Other", "Barber")
    customer = await make_user(stack, "customer", "Nosy", "Customer")
    await run_etl(stack, admin_token)
    await run_etl(stack, admin_token)
    for query in (
        "from=2026-13-01",
        "to=yesterday",
        "from=2026-02-10&to=2026-02-01",
        "from=2024-01-01&to=2025-06-01",
        "sort=nope",
        "order=sideways",
        "limit=0",
        "offset=-1",
    ):
        reply = await call("GET", f"{base}/analytics/barbers?{query}", token=admin_token)
        assert reply.code == 400 and reply.json["detail"], (query, reply)
    reply = await call(
        "GET", f"{base}/analytics/barbers/{barber.id}/daily?from=2026-02-10&to=2026-02-01", token=barber.token
    )
    assert reply.code == 400, reply
    # Authentication and roles.
    assert (await call("GET", f"{base}/analytics/barbers")).code == 401
    assert (await call("GET", f"{base}/analytics/barbers", token=customer.token)).code == 403
    assert (await call("GET", f"{base}/analytics/barbers", token=barber.token)).code == 403
    assert (await call("GET", f"{base}/runs", token=barber.token)).code == 403
    assert (await call("POST", f"{base}/runs", token=customer.token)).code == 403
    assert (await call("POST", f"{base}/runs")).code == 401
    own = await call("GET", f"{base}/analytics/barbers/{barber.id}/daily", token=barber.token)
    assert own.code == 200, own
    assert len(own.json["days"]) == 30 and own.json["barber"]["barber_id"] == barber.id
    assert own.json["to"] == today().isoformat()
    assert (await call("GET", f"{base}/analytics/barbers/{other.id}/daily", token=barber.token)).code == 403
    assert (await call("GET", f"{base}/analytics/barbers/{barber.id}/daily", token=customer.token)).code == 403
    assert (await call("GET", f"{base}/analytics/barbers/{customer.id}/daily", token=admin_token)).code == 404
    assert (await call("GET", f"{base}/analytics/barbers/999999999/daily", token=admin_token)).code == 404
    assert (await call("GET", f"{base}/runs/999999999", token=admin_token)).code == 404
    # Defaults, sorting and paging.
    board = await leaderboard(stack, admin_token, today() - timedelta(days=29), today(), sort="username", order="asc")
    names = [r["username"] for r in board["barbers"]]
    assert names == sorted(names) and board["total"] >= 2
    reply = await call("GET", f"{base}/analytics/barbers?limit=1&offset=1", token=admin_token)
    assert reply.code == 200 and len(reply.json["barbers"]) == 1
    assert (reply.json["sort"], reply.json["order"], reply.json["limit"]) == ("customer_messages", "desc", 1)
    runs = await call("GET", f"{base}/runs?limit=2", token=admin_token)
    assert runs.code == 200 and len(runs.json["runs"]) == 2
    assert runs.json["runs"][0]["run_id"] > runs.json["runs"][1]["run_id"]
    record = runs.json["runs"][0]
    assert set(record) >= {
        "run_id",
        "mode",
        "state",
        "started_at",
        "finished_at",
        "rows",
        "watermarks",
        "error",
        "elasticsearch",
    }
    assert record["elasticsearch"] == {"indexed": 0, "error": None}
    # The dashboard page is public and served with its static files.
    page = await call("GET", f"{base}/dashboard")
    assert page.code == 200 and page.headers["Content-Type"].startswith("text/html")
    assert b"<html" in page.raw.lower()
    missing = await call("GET", f"{base}/static/no-such-file.js")
    assert missing.code == 404
    # Status and metrics, on the instance itself.
    status = await call("GET", stack.url("etl") + "/utilities/status")
    assert status.code == 200 and status.json["service"] == "etl" and status.json["mongo"] == "ok"
    scrape = await call("GET", stack.url("etl") + "/metrics")
    assert scrape.code == 200 and b'etl_runs_total{state="succeeded"}' in scrape.raw
