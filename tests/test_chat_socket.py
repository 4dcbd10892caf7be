"""The chat socket against the real stack: delivery across instances, replay, refusals,
error frames, the flood guard, slow readers, and gaps filled from MongoDB."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator

import pytest

from chat.store import Store, iso_now
from tests.http import call
from tests.procs import ServiceProcess, start_service
from tests.stackproc import StackProcess
from tests.test_chat_support import (
    ChatClient,
    ChatUser,
    RawSocket,
    make_user,
    refused_with,
    socket_url,
    start_chat,
    status,
)
from tests.util import wait_until


@pytest.fixture(scope="module")
async def store(stack: StackProcess) -> Store:
    s = Store.connect(stack.env["MONGO_URL"], "chat")
    yield s
    await s.close()


async def pair(stack: StackProcess, base: str) -> tuple[ChatUser, ChatUser, str]:
    customer = await make_user(stack, "customer", "Cleo", "Customer")
    employee = await make_user(stack, "employee", "Eli", "Employee")
    return customer, employee, await start_chat(base, customer, employee)


async def insert_direct(store: Store, chat_id: str, seqs: range, sender: ChatUser, text: str = "stored") -> None:
    """Messages written straight to MongoDB, as by a chat instance that died before publishing."""
    now = time.time()
    docs = [
        {
            "_id": uuid.uuid4().hex,
            "chat_id": chat_id,
            "seq": seq,
            "sender": {"id": sender.id, "first_name": sender.first_name, "last_name": sender.last_name},
            "message": f"{text} {seq}",
            "sent_at": iso_now(now),
            "created_at": now,
        }
        for seq in seqs
    ]
    outcomes = await store.insert_messages(docs)
    assert all(o.ok for o in outcomes)


# -- delivery ------------------------------------------------------------------------------
async def test_two_instances_exchange_messages_in_order(stack: StackProcess, c1: str, c2: str) -> None:
    customer, employee, chat_id = await pair(stack, c1)
    a = await ChatClient.connect(socket_url(c1, chat_id, customer.token))
    b = await ChatClient.connect(socket_url(c2, chat_id, employee.token))
    try:
        n = 15
        await asyncio.gather(
            *(a.send(f"from a {i}", client_id=f"a{i}") for i in range(n)),
            *(b.send(f"from b {i}", client_id=f"b{i}") for i in range(n)),
        )
        await a.wait_messages(2 * n)
        await b.wait_messages(2 * n)
        # Both see the same messages, each once, in seq order 1..2n.
        assert a.seqs == list(range(1, 2 * n + 1))
        assert b.messages == a.messages
        # Each sender's own messages keep their order.
        mine = [m["client_id"] for m in a.messages if m["client_id"].startswith("a")]
        assert mine == [f"a{i}" for i in range(n)]
        first = a.messages[0]
        assert set(first) == {"type", "chat_id", "seq", "message", "sender", "sent_at", "client_id"}
        assert first["chat_id"] == chat_id
        by_sender = {m["sender"]["id"]: m["sender"] for m in a.messages}
        assert by_sender[customer.id] == {"id": customer.id, "first_name": "Cleo", "last_name": "Customer"}
        assert by_sender[employee.id] == {"id": employee.id, "first_name": "Eli", "last_name": "Employee"}
        assert not a.errors and not b.errors
    finally:
        await a.close()
        await b.close()


async def test_reconnect_with_since_gets_what_was_missed_then_live(stack: StackProcess, c1: str, c2: str) -> None:
    customer, employee, chat_id = await pair(stack, c1)
    a = await ChatClient.connect(socket_url(c1, chat_id, customer.token))
    b = await ChatClient.connect(socket_url(c2, chat_id, employee.token))
    await a.send("one")
    await a.send("two")
    await b.wait_messages(2)
    seen = b.last_seq
    await b.close()
    for i in range(5):
        await a.send(f"while away {i}")
    await a.wait_messages(7)
    b2 = await ChatClient.connect(socket_url(c2, chat_id, employee.token, since=seen))
    try:
        await b2.wait_messages(5)
        assert b2.seqs == [3, 4, 5, 6, 7]
        assert [m["message"] for m in b2.messages] == [f"while away {i}" for i in range(5)]
        await b2.send("back")
        await a.wait_messages(8)
        await b2.wait_messages(6)
        assert b2.seqs == [3, 4, 5, 6, 7, 8]
        assert a.messages[-1]["message"] == "back"
    finally:
        await a.close()
        await b2.close()


async def test_without_since_the_last_50_then_live(stack: StackProcess, c1: str, store: Store) -> None:
    customer, employee, chat_id = await pair(stack, c1)
    await insert_direct(store, chat_id, range(1, 61), customer)
    client = await ChatClient.connect(socket_url(c1, chat_id, employee.token))
    try:
        await client.wait_messages(50)
        assert client.seqs == list(range(11, 61))
        await client.send("live")
        await client.wait_messages(51)
        assert client.messages[-1]["seq"] == 61 and client.messages[-1]["message"] == "live"
    finally:
        await client.close()
    # since=0 replays everything.
    replay = await ChatClient.connect(socket_url(c1, chat_id, employee.token, since=0))
    try:
        await replay.wait_messages(61)
        assert replay.seqs == list(range(1, 62))
    finally:
        await replay.close()


async def test_token_in_the_websocket_protocol_header(stack: StackProcess, c2: str) -> None:
    customer, _employee, chat_id = await pair(stack, c2)
    client = await ChatClient.connect(socket_url(c2, chat_id), subprotocols=["bearer", customer.token])
    try:
        assert client.conn.selected_subprotocol == "bearer"
        await client.send("via subprotocol")
        msgs = await client.wait_messages(1)
        assert msgs[0]["sender"]["id"] == customer.id
    finally:
        await client.close()


async def test_the_returned_ws_url_works_through_the_gateway(stack: StackProcess, c1: str) -> None:
    if "gateway" not in stack.control.status()["processes"]:
        pytest.skip("needs the gateway in the stack")
    customer = await make_user(stack, "customer")
    employee = await make_user(stack, "employee")
    started = await call("POST", f"{c1}/chats/start?employee_id={employee.id}", token=customer.token)
    ws_url = started.json["ws_url"]
    a = await ChatClient.connect(f"{ws_url}?token={customer.token}")
    b = await ChatClient.connect(ws_url, subprotocols=["bearer", employee.token])
    try:
        await a.send("through the gateway")
        await b.wait_messages(1)
        await b.send("and back")
        await a.wait_messages(2)
        assert a.messages == b.messages
        assert [m["message"] for m in a.messages] == ["through the gateway", "and back"]
    finally:
        await a.close()
        await b.close()
    # Refusals keep their close codes through the gateway.
    outsider = await make_user(stack, "customer")
    assert await refused_with(f"{ws_url}?token={outsider.token}") == 4403


async def test_every_token_form_the_gateway_takes_reaches_chat(stack: StackProcess, c1: str) -> None:
    """The gateway and chat read a socket's token by one rule: ``bearer.<token>`` as the
    offered protocol and an Authorization header work end to end, not only at the gateway."""
    if "gateway" not in stack.control.status()["processes"]:
        pytest.skip("needs the gateway in the stack")
    customer = await make_user(stack, "customer")
    employee = await make_user(stack, "employee")
    started = await call("POST", f"{c1}/chats/start?employee_id={employee.id}", token=customer.token)
    ws_url = started.json["ws_url"]
    a = await ChatClient.connect(ws_url, subprotocols=[f"bearer.{customer.token}"])
    b = await ChatClient.connect(ws_url, headers={"Authorization": f"Bearer {employee.token}"})
    try:
        assert a.conn.selected_subprotocol == f"bearer.{customer.token}"
        await a.send("dotted protocol")
        await b.wait_messages(1)
        await b.send("header")
        await a.wait_messages(2)
        assert [m["sender"]["id"] for m in a.messages] == [customer.id, employee.id]
    finally:
        await a.close()
        await b.close()
    assert await refused_with(ws_url, subprotocols=["bearer.not-a-token"]) == 4401


# -- refusals ------------------------------------------------------------------------------
async def test_refusals_close_with_the_right_codes(stack: StackProcess, c1: str) -> None:
    customer, _employee, chat_id = await pair(stack, c1)
    outsider = await make_user(stack, "customer")
    assert await refused_with(socket_url(c1, chat_id)) == 4401
    assert await refused_with(socket_url(c1, chat_id, "not-a-token")) == 4401
    assert await refused_with(socket_url(c1, chat_id), headers={"X-User": str(customer.id)}) == 4401
    assert await refused_with(socket_url(c1, chat_id, "bad"), subprotocols=["bearer", "also-bad"]) == 4401
    assert await refused_with(socket_url(c1, chat_id, outsider.token)) == 4403
    assert await refused_with(socket_url(c1, "0" * 32, customer.token)) == 4404
    assert await refused_with(socket_url(c1, chat_id, customer.token) + "&since=-1") == 4400
    assert await refused_with(socket_url(c1, chat_id, customer.token) + "&since=abc") == 4400


async def test_bad_frames_get_error_frames_and_store_nothing(stack: StackProcess, c1: str) -> None:
    customer, _employee, chat_id = await pair(stack, c1)
    client = await ChatClient.connect(socket_url(c1, chat_id, customer.token))
    try:
        await client.send_raw("{not json")
        await client.send_raw("[1, 2]")
        await client.send_raw(json.dumps({"type": "shout", "message": "hi"}))
        await client.send_raw(json.dumps({"message": "no type"}))
        await client.send("")
        await client.send("   \n ")
        await client.send_raw(json.dumps({"type": "chat_message", "message": 42}))
        await client.send("x" * 4001, client_id="big")
        await client.send("ok", client_id=["not", "a", "string"])
        errors = await client.wait_errors(9)
        assert [e["code"] for e in errors] == [
            "malformed",
            "malformed",
            "unknown_type",
            "unknown_type",
            "empty",
            "empty",
            "empty",
            "too_long",
            "invalid",
        ]
        assert errors[7]["client_id"] == "big"
        assert all(e["detail"] for e in errors)
        await client.send("y" * 4000)  # exactly at the limit is fine
        msgs = await client.wait_messages(1)
        assert msgs[0]["seq"] == 1 and len(msgs[0]["message"]) == 4000
    finally:
        await client.close()
    history = await call("GET", f"{c1}/chats/history?id={chat_id}", token=customer.token)
    assert [m["seq"] for m in history.json["messages"]] == [1]


async def test_resend_with_the_same_client_id_is_stored_once(stack: StackProcess, c1: str, c2: str) -> None:
    customer, _employee, chat_id = await pair(stack, c1)
    a = await ChatClient.connect(socket_url(c1, chat_id, customer.token))
    try:
        await a.send("only once", client_id="dup-1")
        await a.wait_messages(1)
    finally:
        await a.close()
    again = await ChatClient.connect(socket_url(c2, chat_id, customer.token, since=0))
    try:
        await again.wait_messages(1)
        await again.send("only once", client_id="dup-1")
        await again.send("next", client_id="dup-2")
        await again.wait_messages(2)
        assert [(m["seq"], m["client_id"]) for m in again.messages] == [(1, "dup-1"), (2, "dup-2")]
    finally:
        await again.close()


# -- flood guard and slow readers ------------------------------------------------------------
@pytest.fixture(scope="module")
async def tuned(stack: StackProcess) -> AsyncIterator[ServiceProcess]:
    """One more chat instance with a tight flood guard and a fast keepalive."""
    env = {
        "CHAT_FLOOD_RATE_PER_S": "2",
        "CHAT_FLOOD_BURST": "10",
        "CHAT_WS_PING_INTERVAL_S": "0.5",
        "CHAT_WS_PING_TIMEOUT_S": "0.5",
    }
    async with await start_service(stack, "chat", extra_env=env, name="chat-tuned") as inst:
        yield inst


async def test_flood_guard_refuses_bursts(stack: StackProcess, tuned: ServiceProcess) -> None:
    base = tuned.url
    customer, _employee, chat_id = await pair(stack, base)
    client = await ChatClient.connect(socket_url(base, chat_id, customer.token))
    before = (await status(base))["fanout"]["flood_rejections"]
    try:
        sent = 60
        for i in range(sent):
            await client.send(f"spam {i}")
        await wait_until(
            lambda: len(client.messages) + len(client.errors) >= sent, timeout=20, message="an answer for every frame"
        )
        limited = [e for e in client.errors if e["code"] == "rate_limited"]
        stored = len(client.messages)
        # The burst of 10 passes (plus 2/s refilled while storing), the flood does not.
        assert 10 <= stored < sent / 2, (stored, client.errors[:3])
        assert stored + len(limited) == sent
        assert "per second" in limited[0]["detail"]
    finally:
        await client.close()
    assert (await status(base))["fanout"]["flood_rejections"] >= before + len(limited)
    history = await call("GET", f"{base}/chats/history?id={chat_id}&limit=100", token=customer.token)
    assert len(history.json["messages"]) == stored


async def test_a_client_that_stops_reading_is_disconnected(stack: StackProcess) -> None:
    # One more chat instance with a small send buffer and no flood guard to speak of, so
    # one sender can outpace a reader quickly.
    env = {
        "CHAT_WS_MAX_BUFFER_BYTES": "65536",
        "CHAT_WS_SNDBUF_BYTES": "16384",
        "CHAT_WS_SEND_TIMEOUT_S": "2",
        "CHAT_FLOOD_RATE_PER_S": "100000",
        "CHAT_FLOOD_BURST": "100000",
    }
    async with await start_service(stack, "chat", extra_env=env, name="chat-slowtest") as inst:
        customer, employee, chat_id = await pair(stack, inst.url)
        fast = await ChatClient.connect(socket_url(inst.url, chat_id, employee.token))
        port = int(inst.url.rsplit(":", 1)[1])
        slow = RawSocket("127.0.0.1", port, f"/chat/{chat_id}?token={customer.token}&since=0")
        sender = await ChatClient.connect(socket_url(inst.url, chat_id, customer.token))
        try:
            await wait_until(lambda: _sockets(inst.url, 3), timeout=10, message="three sockets open")
            n = 150  # ~600 kB: far beyond the 64 kB limit plus what the kernel holds
            text = "z" * 3900
            for i in range(n):
                # Paced by the echo, so readers that do read never fall behind.
                await sender.send(text, client_id=f"s{i}")
                await sender.wait_messages(i + 1)
            # The reader that never reads is dropped; the others get everything.
            await wait_until(lambda: _slow_dropped(inst.url), timeout=30, message="slow reader disconnected")
            await fast.wait_messages(n, timeout=60)
            assert fast.seqs == list(range(1, n + 1))
            await sender.wait_messages(n, timeout=60)
            # What the slow client still had in flight ends with the server closing it.
            received = await asyncio.to_thread(slow.drain_until_closed)
            assert received < n * len(text)
            assert (await status(inst.url))["sockets"] == 2
        finally:
            slow.close()
            await fast.close()
            await sender.close()


async def test_keepalive_drops_a_peer_that_never_answers_pings(stack: StackProcess, tuned: ServiceProcess) -> None:
    customer, employee, chat_id = await pair(stack, tuned.url)
    port = int(tuned.url.rsplit(":", 1)[1])
    # A real client answers pings by itself; the raw one never reads, so never pongs.
    alive = await ChatClient.connect(socket_url(tuned.url, chat_id, employee.token))
    silent = RawSocket("127.0.0.1", port, f"/chat/{chat_id}?token={customer.token}")
    try:
        await wait_until(lambda: _sockets(tuned.url, 2), timeout=10, message="two sockets open")
        await wait_until(lambda: _sockets(tuned.url, 1), timeout=20, message="the silent peer dropped")
        await asyncio.to_thread(silent.drain_until_closed)  # the server really hung up
        assert not alive.closed.is_set()
        await alive.send("still alive")
        msgs = await alive.wait_messages(1)
        assert msgs[0]["message"] == "still alive"
    finally:
        silent.close()
        await alive.close()


async def _sockets(base: str, n: int) -> bool:
    return (await status(base))["sockets"] == n


async def _slow_dropped(base: str) -> bool:
    return (await status(base))["fanout"]["slow_disconnects"] >= 1


# -- the database is the source of truth -------------------------------------------------------
async def test_a_gap_is_filled_from_the_database_before_later_messages(
    stack: StackProcess, c1: str, store: Store
) -> None:
    # The receiving instance's idle-room tail check is off, so seq 2 can only reach it by
    # the gap fill (a tail check in between would find it first).
    receiver = await start_service(stack, "chat", extra_env={"CHAT_TAIL_CHECK_S": "3600"}, name="chat-no-tail")
    c2 = receiver.url
    customer, employee, chat_id = await pair(stack, c1)
    a = await ChatClient.connect(socket_url(c1, chat_id, customer.token))
    b = await ChatClient.connect(socket_url(c2, chat_id, employee.token))
    try:
        await a.send("first")
        await b.wait_messages(1)
        filled_before = (await status(c2))["fanout"]["gap_filled"]
        # seq 2 is stored but never published, as if its writer died right after storing.
        await insert_direct(store, chat_id, range(2, 3), customer, "unpublished")
        await a.send("third")  # chat-1 finds seq 2 taken and stores this as 3
        await b.wait_messages(3)
        assert b.seqs == [1, 2, 3]
        assert [m["message"] for m in b.messages] == ["first", "unpublished 2", "third"]
        await a.wait_messages(3)
        assert a.seqs == [1, 2, 3]
        assert (await status(c2))["fanout"]["gap_filled"] > filled_before
    finally:
        await a.close()
        await b.close()
        await receiver.stop()


async def test_a_write_to_a_chat_deleted_unbeknown_to_the_instance_leaves_nothing(
    stack: StackProcess, c1: str, store: Store
) -> None:
    """The deletion's broadcast can be lost (it rides on pub/sub): here the chat is
    removed straight from MongoDB, so chat-1 still has it open. A message sent then must
    not be left behind with no chat: the writer re-checks the chat after writing."""
    customer, _employee, chat_id = await pair(stack, c1)
    a = await ChatClient.connect(socket_url(c1, chat_id, customer.token))
    try:
        await a.send("before")
        await a.wait_messages(1)
        await store.chats.delete_one({"_id": {"$eq": chat_id}})
        await store.messages.delete_many({"chat_id": {"$eq": chat_id}})
        await a.send("after the sweep")
        assert await a.wait_closed() == 4404
        assert [m["message"] for m in a.messages] == ["before"]
        assert await store.messages.count_documents({"chat_id": {"$eq": chat_id}}) == 0
    finally:
        await a.close()


async def test_an_unpublished_last_message_still_arrives(stack: StackProcess, c1: str, c2: str, store: Store) -> None:
    customer, employee, chat_id = await pair(stack, c1)
    b = await ChatClient.connect(socket_url(c2, chat_id, employee.token))
    try:
        await wait_until(lambda: _sockets_at_least(c2, 1), timeout=5)
        await insert_direct(store, chat_id, range(1, 3), customer, "orphan")
        # No later message reveals the gap: the room's tail check finds them.
        await b.wait_messages(2, timeout=20)
        assert b.seqs == [1, 2]
    finally:
        await b.close()


async def _sockets_at_least(base: str, n: int) -> bool:
    return (await status(base))["sockets"] >= n
