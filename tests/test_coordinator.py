"""The deletion coordinator: 2PC and saga through the gateway, crashes at every point.

Every outcome is checked as all-or-nothing: the user and all their chats either fully
present and usable, or fully gone (sign-in 401, chats 404, cache entry absent), with no
prepared transaction and no chat mark left behind.
"""

from __future__ import annotations

import asyncio
import uuid
from dataclasses import dataclass

import psycopg
import pytest
from pymongo import AsyncMongoClient
from redis.asyncio.cluster import ClusterNode, RedisCluster
from tornado.httpclient import HTTPClientError

from chat.cache import TOMBSTONE
from tests.http import call
from tests.procs import ServiceProcess
from tests.stackproc import StackProcess
from tests.test_chat_support import ChatClient, ChatUser, make_user, socket_url, start_chat
from tests.util import free_port, wait_until

PASSWORD = "correct horse"


def service_secret(stack: StackProcess) -> str:
    return stack.layout.service_secret.read_text().strip()


@dataclass
class Party:
    """A user to delete, the people they chat with, and the chats (with messages)."""

    user: ChatUser
    others: list[ChatUser]
    chat_ids: list[str]
    messages: int


async def make_party(stack: StackProcess, chats: int = 2, messages: int = 3) -> Party:
    chat_base = stack.url("chat", 0)
    customer = await make_user(stack, "customer", "Del", "Etee")
    others, chat_ids = [], []
    for _ in range(chats):
        employee = await make_user(stack, "employee", "Bar", "Ber")
        chat_id = await start_chat(chat_base, customer, employee)
        client = await ChatClient.connect(socket_url(chat_base, chat_id, customer.token))
        try:
            for i in range(messages):
                await client.send(f"hello {i}")
            await client.wait_messages(messages)
        finally:
            await client.close()
        others.append(employee)
        chat_ids.append(chat_id)
    return Party(customer, others, chat_ids, messages * chats)


async def delete(stack: StackProcess, token: str, user_id: int, mode: str = "2pc", base: str | None = None):
    return await call(
        "DELETE", f"{base or stack.url('gateway')}/admin/users/{user_id}?mode={mode}", token=token, timeout=60
    )


async def transactions_of(stack: StackProcess, token: str, user_id: int, base: str | None = None) -> list[dict]:
    reply = await call("GET", f"{base or stack.url('gateway')}/admin/transactions?user_id={user_id}", token=token)
    assert reply.code == 200, reply
    return reply.json["transactions"]


async def wait_finished(stack: StackProcess, token: str, user_id: int, timeout: float = 60) -> dict:
    async def finished() -> dict | None:
        txs = await transactions_of(stack, token, user_id)
        return txs[0] if txs and txs[0]["completed"] else None

    return await wait_until(finished, timeout=timeout, interval=0.3, message=f"deletion of {user_id} finished")


# -- the two outcomes ----------------------------------------------------------------------
def prepared_xacts(stack: StackProcess) -> list[str]:
    with psycopg.connect(stack.layout.pg_dsn("authen"), autocommit=True) as conn:
        return [r[0] for r in conn.execute("SELECT gid FROM pg_prepared_xacts").fetchall()]


async def chat_marks(stack: StackProcess, chat_ids: list[str]) -> list[dict]:
    client: AsyncMongoClient = AsyncMongoClient(stack.env["MONGO_URL"])
    try:
        return [c async for c in client.chat.chats.find({"_id": {"$in": chat_ids}, "deleting": {"$ne": None}})]
    finally:
        await client.close()


async def stored_messages(stack: StackProcess, chat_ids: list[str]) -> int:
    client: AsyncMongoClient = AsyncMongoClient(stack.env["MONGO_URL"])
    try:
        return await client.chat.messages.count_documents({"chat_id": {"$in": chat_ids}})
    finally:
        await client.close()


async def cached(stack: StackProcess, user_id: int) -> bool:
    """Whether chat's cache holds the user's data (a deletion leaves only a tombstone)."""
    nodes = [ClusterNode(*n.split(":")) for n in stack.env["REDIS_CLUSTER_NODES"].split(",")]
    client = RedisCluster(startup_nodes=nodes, decode_responses=True)
    try:
        return (await client.get(f"user:{user_id}")) not in (None, TOMBSTONE)
    finally:
        await client.aclose()


async def assert_present(stack: StackProcess, party: Party) -> None:
    gw = stack.url("gateway")
    user = party.user
    reply = await call("POST", gw + "/authen/authen/signin", {"username": user.username, "password": PASSWORD})
    assert reply.code == 200, f"user should still sign in: {reply}"
    assert (await call("GET", f"{stack.url('authen', 1)}/utilities/check?user_id={user.id}")).code == 200
    for chat_id in party.chat_ids:
        reply = await call("GET", f"{gw}/chat/chats/connect?id={chat_id}", token=user.token)
        assert reply.code == 200, f"chat {chat_id} should be usable: {reply}"
    assert await stored_messages(stack, party.chat_ids) == party.messages
    # Usable: a new message goes through.
    client = await ChatClient.connect(socket_url(stack.url("chat", 1), party.chat_ids[0], user.token))
    try:
        await client.send("still here")
        await wait_until(lambda: any(m["message"] == "still here" for m in client.messages), timeout=15)
    finally:
        await client.close()
    assert prepared_xacts(stack) == []
    assert await chat_marks(stack, party.chat_ids) == []


async def assert_gone(stack: StackProcess, party: Party) -> None:
    gw = stack.url("gateway")
    user = party.user
    reply = await call("POST", gw + "/authen/authen/signin", {"username": user.username, "password": PASSWORD})
    assert reply.code == 401, reply
    assert (await call("GET", f"{stack.url('authen', 1)}/utilities/check?user_id={user.id}")).code == 404
    for other, chat_id in zip(party.others, party.chat_ids):
        reply = await call("GET", f"{gw}/chat/chats/connect?id={chat_id}", token=other.token)
        assert reply.code == 404, f"chat {chat_id} should be gone: {reply}"
    assert await stored_messages(stack, party.chat_ids) == 0
    assert not await cached(stack, user.id)
    assert prepared_xacts(stack) == []
    assert await chat_marks(stack, party.chat_ids) == []


# -- the admin API -------------------------------------------------------------------------
async def test_admin_api_errors(stack: StackProcess, admin_token: str) -> None:
    gw = stack.url("gateway")
    customer = await make_user(stack, "customer")
    assert (await call("DELETE", f"{gw}/admin/users/{customer.id}")).code == 401
    assert (await call("DELETE", f"{gw}/admin/users/{customer.id}", token="not-a-token")).code == 401
    reply = await call("DELETE", f"{gw}/admin/users/{customer.id}", token=customer.token)
    assert reply.code == 403 and "detail" in reply.json
    reply = await delete(stack, admin_token, customer.id, mode="quick")
    assert reply.code == 400 and "mode" in reply.json["detail"]
    reply = await delete(stack, admin_token, 987_654_321)
    assert reply.code == 404
    assert (await call("GET", f"{gw}/admin/transactions/{uuid.uuid4()}", token=admin_token)).code == 404
    assert (await call("GET", f"{gw}/admin/transactions/nope", token=admin_token)).code == 400
    assert (await call("GET", f"{gw}/admin/transactions?state=maybe", token=admin_token)).code == 400
    assert (await call("GET", f"{gw}/admin/transactions", token=customer.token)).code == 403
    # The participants' endpoints are not public.
    assert (await call("POST", f"{gw}/authen/internal/tx/x/prepare", {"user_id": 1})).code == 404
    assert (await call("POST", f"{gw}/chat/internal/tx/x/prepare", {"user_id": 1})).code == 404
    direct = await call("POST", f"{stack.url('authen')}/internal/tx/barber-tx-x/prepare", {"user_id": customer.id})
    assert direct.code == 403


async def test_delete_is_503_and_changes_nothing_when_authen_cannot_be_reached(
    stack: StackProcess, admin_token: str
) -> None:
    customer = await make_user(stack, "customer")
    # A gateway that cannot reach discovery knows no participant instance.
    lost = ServiceProcess(
        stack,
        "gateway",
        name="gateway-no-discovery",
        health_path="/status",
        extra_env={"DISCOVERY_URL": f"http://127.0.0.1:{free_port()}"},
    )
    async with lost:
        reply = await delete(stack, admin_token, customer.id, base=lost.url)
        assert reply.code == 503 and "authen" in reply.json["detail"], reply
    assert (await call("GET", f"{stack.url('authen')}/utilities/check?user_id={customer.id}")).code == 200
    assert await transactions_of(stack, admin_token, customer.id) == []


async def test_coordinator_log_down_is_503_and_changes_nothing(stack: StackProcess, admin_token: str) -> None:
    """The log lives on the PostgreSQL primary: with it stopped, the admin API answers 503
    (authen still answers reads from its replicas, so the DELETE gets as far as the log)."""
    customer = await make_user(stack, "customer")
    gw = stack.url("gateway")
    await asyncio.to_thread(stack.control.stop, "postgres-primary")
    try:
        reply = await delete(stack, admin_token, customer.id)
        assert reply.code == 503 and "log" in reply.json["detail"], reply
        reply = await call("GET", f"{gw}/admin/transactions?user_id={customer.id}", token=admin_token)
        assert reply.code == 503, reply
    finally:
        await asyncio.to_thread(stack.control.start, "postgres-primary")

    async def log_back() -> bool:
        return (await call("GET", f"{gw}/admin/transactions?user_id={customer.id}", token=admin_token)).code == 200

    await wait_until(log_back, timeout=30, interval=0.3, message="the coordinator's log reachable again")
    assert await transactions_of(stack, admin_token, customer.id) == []
    assert (await call("GET", f"{stack.url('authen')}/utilities/check?user_id={customer.id}")).code == 200


async def test_2pc_deletes_user_and_chats(stack: StackProcess, admin_token: str) -> None:
    party = await make_party(stack)
    reply = await delete(stack, admin_token, party.user.id)
    assert reply.code == 200, reply
    assert reply.json["state"] == "committed", reply
    tx = (
        await call(
            "GET", f"{stack.url('gateway')}/admin/transactions/{reply.json['transaction_id']}", token=admin_token
        )
    ).json
    assert tx["mode"] == "2pc" and tx["decision"] == "commit" and tx["completed"]
    assert {p["state"] for p in tx["participants"].values()} == {"committed"}
    await assert_gone(stack, party)
    listed = await call("GET", f"{stack.url('gateway')}/admin/transactions?state=committed", token=admin_token)
    assert reply.json["transaction_id"] in [t["transaction_id"] for t in listed.json["transactions"]]


async def test_saga_deletes_user_and_chats(stack: StackProcess, admin_token: str) -> None:
    party = await make_party(stack, chats=3, messages=4)
    reply = await delete(stack, admin_token, party.user.id, mode="saga")
    assert reply.code == 202, reply
    tx_id = reply.json["transaction_id"]
    assert reply.headers["Location"] == f"/admin/transactions/{tx_id}"
    tx = await wait_finished(stack, admin_token, party.user.id)
    assert tx["transaction_id"] == tx_id and tx["state"] == "committed"
    steps = {s["name"]: s for s in tx["steps"]}
    assert [s["state"] for s in tx["steps"]] == ["done"] * 4
    assert steps["purge_chats"]["progress"]["messages_deleted"] == party.messages
    assert steps["purge_chats"]["progress"]["chats_deleted"] == 3
    await assert_gone(stack, party)


async def test_chat_unreachable_during_prepare_aborts(stack: StackProcess, admin_token: str) -> None:
    party = await make_party(stack, chats=1)
    stack.control.stop("chat-1")
    stack.control.stop("chat-2")
    try:
        reply = await delete(stack, admin_token, party.user.id)
        assert reply.code == 200, reply
        assert reply.json["state"] == "aborted" and "chat" in reply.json["detail"]
    finally:
        stack.control.start("chat-1")
        stack.control.start("chat-2")
    tx = await wait_finished(stack, admin_token, party.user.id)
    assert tx["decision"] == "abort"
    await assert_present(stack, party)


async def test_same_user_deleted_twice_concurrently(stack: StackProcess, admin_token: str) -> None:
    party = await make_party(stack, chats=1)
    first, second = await asyncio.gather(
        delete(stack, admin_token, party.user.id), delete(stack, admin_token, party.user.id)
    )
    codes = sorted([first.code, second.code])
    assert codes[0] == 200 and codes[1] in (404, 409), (first, second)
    committed = [r for r in (first, second) if r.code == 200]
    assert committed[0].json["state"] == "committed"
    txs = await transactions_of(stack, admin_token, party.user.id)
    assert [t["state"] for t in txs] == ["committed"]
    await assert_gone(stack, party)


async def test_user_deleted_while_chatting(stack: StackProcess, admin_token: str) -> None:
    party = await make_party(stack, chats=1, messages=2)
    chat_id, employee = party.chat_ids[0], party.others[0]
    listener = await ChatClient.connect(socket_url(stack.url("chat", 1), chat_id, employee.token))
    try:
        await listener.wait_messages(2)
        reply = await delete(stack, admin_token, party.user.id)
        assert reply.code == 200 and reply.json["state"] == "committed", reply
        assert await listener.wait_closed(15) in (4409, 4404)
    finally:
        await listener.close()
    # Sending after the deletion is refused: the chat is gone.
    late = await ChatClient.connect(socket_url(stack.url("chat", 0), chat_id, employee.token))
    assert await late.wait_closed(10) == 4404
    await assert_gone(stack, party)


# -- participants' protocol ---------------------------------------------------------------
async def test_participant_abort_then_late_prepare_is_refused(stack: StackProcess) -> None:
    user = await make_user(stack, "customer")
    headers = {"X-Service-Token": service_secret(stack)}
    for service in ("authen", "chat"):
        gid = f"barber-tx-{uuid.uuid4()}"
        base = stack.url(service)
        reply = await call("POST", f"{base}/internal/tx/{gid}/abort", headers=headers)
        assert reply.code == 200 and reply.json["state"] == "aborted", reply
        reply = await call("POST", f"{base}/internal/tx/{gid}/prepare", {"user_id": user.id}, headers=headers)
        assert reply.code == 409, reply
        reply = await call("GET", f"{base}/internal/tx/{gid}", headers=headers)
        assert reply.json["state"] == "aborted"
    assert (
        await call("POST", stack.url("authen") + "/authen/signin", {"username": user.username, "password": PASSWORD})
    ).code == 200


async def test_chat_mark_closes_sockets_everywhere_and_abort_releases(stack: StackProcess) -> None:
    party = await make_party(stack, chats=1, messages=1)
    chat_id, employee = party.chat_ids[0], party.others[0]
    headers = {"X-Service-Token": service_secret(stack)}
    # Connected to chat-2; the prepare is served by chat-1.
    listener = await ChatClient.connect(socket_url(stack.url("chat", 1), chat_id, employee.token))
    await listener.wait_messages(1)
    # Not a coordinator id: its recovery must not resolve this one under the test.
    gid = f"test-tx-{uuid.uuid4()}"
    reply = await call(
        "POST", f"{stack.url('chat', 0)}/internal/tx/{gid}/prepare", {"user_id": party.user.id}, headers=headers
    )
    assert reply.code == 200 and reply.json["state"] == "prepared", reply
    assert await listener.wait_closed(10) == 4409
    assert len(await chat_marks(stack, [chat_id])) == 1
    assert (await call("GET", f"{stack.url('chat', 1)}/chats/connect?id={chat_id}", token=employee.token)).code == 409
    late = await ChatClient.connect(socket_url(stack.url("chat", 1), chat_id, employee.token))
    assert await late.wait_closed(10) == 4409
    reply = await call("POST", f"{stack.url('chat', 1)}/internal/tx/{gid}/abort", headers=headers)
    assert reply.code == 200 and reply.json["state"] == "aborted", reply
    await assert_present(stack, party)


async def test_orphan_prepared_transaction_is_resolved(stack: StackProcess) -> None:
    """A prepare the coordinator never logged (e.g. sent by a coordinator whose log was
    lost), at both participants: recovery presumes abort, rolls authen's back and clears
    chat's marks."""
    party = await make_party(stack, chats=1, messages=2)
    gid = f"barber-tx-{uuid.uuid4()}"
    headers = {"X-Service-Token": service_secret(stack)}
    for name in ("authen", "chat"):
        reply = await call(
            "POST", f"{stack.url(name)}/internal/tx/{gid}/prepare", {"user_id": party.user.id}, headers=headers
        )
        assert reply.code == 200, reply
    assert gid in prepared_xacts(stack)
    assert [m["deleting"] for m in await chat_marks(stack, party.chat_ids)] == [gid]
    await wait_until(
        lambda: gid not in prepared_xacts(stack),
        timeout=30,
        interval=0.3,
        message="orphan prepared transaction rolled back",
    )

    async def unmarked() -> bool:
        return await chat_marks(stack, party.chat_ids) == []

    await wait_until(unmarked, timeout=30, interval=0.3, message="orphan chat marks cleared")
    await assert_present(stack, party)


# -- crashes of the coordinator --------------------------------------------------------------
CRASHES = [
    ("2pc", "after_log_start", "present"),
    ("2pc", "after_authen_prepared", "present"),
    ("2pc", "after_chat_prepared", "present"),
    ("2pc", "after_decision", "gone"),
    ("2pc", "after_authen_committed", "gone"),
    ("saga", "saga_mid", "gone"),
]


@pytest.mark.parametrize("mode,point,outcome", CRASHES, ids=[c[1] for c in CRASHES])
async def test_coordinator_crash(stack: StackProcess, admin_token: str, mode: str, point: str, outcome: str) -> None:
    party = await make_party(stack, chats=2, messages=3)
    port = free_port()
    crashing = ServiceProcess(
        stack,
        "gateway",
        port,
        name=f"gateway-crash-{point}",
        health_path="/status",
        extra_env={"COORDINATOR_CRASH_AT": point, "BARBER_TEST_HOOKS": "1", "COORDINATOR_SAGA_BATCH": "2"},
    )
    await crashing.start()
    try:
        reply = await delete(stack, admin_token, party.user.id, mode=mode, base=crashing.url)
    except (HTTPClientError, OSError):
        reply = None  # the connection died with the gateway
    if mode == "2pc":
        assert reply is None or reply.code == 599, f"the gateway should have crashed at {point}: {reply}"
    assert await crashing.wait_exit(30) == 70
    # Unfinished (its owner's lease still runs): another deletion of the user is a 409,
    # even for a saga that already deactivated the user.
    again = await delete(stack, admin_token, party.user.id, mode=mode)
    assert again.code == 409, again
    # Restarted normally (same address, so it finds its own unfinished transactions).
    restarted = ServiceProcess(stack, "gateway", port, name=f"gateway-after-{point}", health_path="/status")
    async with restarted:
        tx = await wait_finished(stack, admin_token, party.user.id, timeout=90)
    assert tx["state"] == ("committed" if outcome == "gone" else "aborted"), tx
    if mode == "saga":
        # Resumed from the progress saved before the crash (batches of 2): the counts of
        # the run that crashed and of the one that finished add up to every message.
        purge = next(s for s in tx["steps"] if s["name"] == "purge_chats")
        assert purge["progress"]["messages_deleted"] == party.messages, purge
        assert purge["progress"]["batches"] >= 2 and purge["attempts"] >= 2, purge
    if outcome == "gone":
        await assert_gone(stack, party)
    else:
        await assert_present(stack, party)


# -- crashes of a participant ---------------------------------------------------------------
@pytest.mark.parametrize("service", ["authen", "chat"])
async def test_participant_killed_after_preparing(stack: StackProcess, admin_token: str, service: str) -> None:
    """Every instance of the participant exits right after it prepared (before answering);
    the coordinator asks another instance, which finds the transaction prepared, and the
    deletion commits; nothing is left prepared."""
    party = await make_party(stack, chats=1)
    names = [f"{service}-1", f"{service}-2"]
    hooked = [
        ServiceProcess(
            stack,
            service,
            name=f"{service}-hooked-{i}",
            extra_env={
                "PARTICIPANT_CRASH_AT": "after_prepare",
                "BARBER_TEST_HOOKS": "1",
                **({"ENABLE_SLEEPY": "1"} if service == "authen" else {}),
            },
        )
        for i in range(2)
    ]
    for proc in hooked:
        await proc.start()
    for name in names:
        stack.control.stop(name)
    try:

        async def only_hooked() -> bool:
            reply = await call("GET", stack.url("gateway") + "/status", headers=stack.service_headers())
            ports = {i["address"].rsplit(":", 1)[1] for i in reply.json["services"][service]["instances"]}
            return ports == {str(p.port) for p in hooked}

        await wait_until(only_hooked, timeout=30, interval=0.2, message=f"gateway sees only hooked {service}")
        reply = await delete(stack, admin_token, party.user.id)
        assert reply.code == 200, reply
        exited = [p for p in hooked if p.process.poll() is not None]
        assert len(exited) == 1, "exactly one instance should have died after preparing"
        tx = await wait_finished(stack, admin_token, party.user.id)
        assert tx["state"] == "committed"
    finally:
        for name in names:
            stack.control.start(name)
        for proc in hooked:
            await proc.stop()
    await assert_gone(stack, party)


async def test_participant_left_prepared_asks_the_coordinator(stack: StackProcess, admin_token: str) -> None:
    """The gateway dies right after deciding commit: an authen instance that finds the
    transaction prepared too long asks the coordinator (any gateway) and commits it
    itself; the rest is finished by another gateway's recovery.

    The stack's own gateway would resolve the orphan by its periodic recovery, racing the
    participant; while the participant is on trial, the only live coordinator is one
    whose recovery ran once at its start, before the deletion, and not again.
    """
    party = await make_party(stack, chats=1)
    watcher = ServiceProcess(stack, "authen", name="authen-watcher", extra_env={"PARTICIPANT_OUTCOME_AFTER_S": "1"})
    chat_watcher = ServiceProcess(stack, "chat", name="chat-watcher", extra_env={"PARTICIPANT_OUTCOME_AFTER_S": "1"})
    answering = ServiceProcess(
        stack,
        "gateway",
        name="gateway-answering",
        health_path="/status",
        extra_env={"COORDINATOR_RECOVERY_INTERVAL_S": "3600"},
    )
    crashing = ServiceProcess(
        stack,
        "gateway",
        name="gateway-crash-decision",
        health_path="/status",
        extra_env={
            "COORDINATOR_CRASH_AT": "after_decision",
            "BARBER_TEST_HOOKS": "1",
            "COORDINATOR_RECOVERY_INTERVAL_S": "3600",
        },
    )
    stack.control.stop("gateway")
    try:
        await watcher.start()
        await chat_watcher.start()
        await answering.start()
        await crashing.start()
        try:
            await delete(stack, admin_token, party.user.id, base=crashing.url)
        except (HTTPClientError, OSError):
            pass
        assert await crashing.wait_exit(30) == 70
        tx = (await transactions_of(stack, admin_token, party.user.id, base=answering.url))[0]
        gid = f"barber-tx-{tx['transaction_id']}"
        assert tx["decision"] == "commit" and not tx["completed"]
        await wait_until(
            lambda: f"coordinator says commit for {gid}" in watcher.tail(200),
            timeout=30,
            interval=0.2,
            message="the authen instance asked the coordinator",
        )
        # It logs the answer, then commits: wait for the commit, not for the log line.
        await wait_until(
            lambda: gid not in prepared_xacts(stack),
            timeout=10,
            interval=0.1,
            message=f"{gid} committed by the authen instance",
        )
        # chat's instances do the same with their marks (any of them: the marks are shared).
        await wait_until(
            lambda: f"coordinator says commit for {gid}" in chat_watcher.tail(200),
            timeout=30,
            interval=0.2,
            message="the chat instance asked the coordinator",
        )

        async def chat_committed() -> bool:
            return await stored_messages(stack, party.chat_ids) == 0 and await chat_marks(stack, party.chat_ids) == []

        await wait_until(chat_committed, timeout=10, interval=0.1, message=f"{gid} committed by the chat instance")
    finally:
        await watcher.stop()
        await chat_watcher.stop()
        await answering.stop()
        stack.control.start("gateway")
    await wait_finished(stack, admin_token, party.user.id, timeout=90)
    await assert_gone(stack, party)
