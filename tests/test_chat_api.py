"""chat's REST endpoints against the real stack: every route and its errors, the user cache."""

from __future__ import annotations

import asyncio
import json

import pytest

from chat.cache import UserCache
from tests.http import call
from tests.stackproc import StackProcess
from tests.test_chat_support import ChatClient, ChatUser, make_user, socket_url, start_chat, status


@pytest.fixture(scope="module")
async def customer(stack: StackProcess) -> ChatUser:
    return await make_user(stack, "customer", "Cora", "Client")


@pytest.fixture(scope="module")
async def employee(stack: StackProcess) -> ChatUser:
    return await make_user(stack, "employee", "Bart", "Barber")


# -- POST /chats/start -------------------------------------------------------------------
async def test_start_creates_then_returns_the_same_chat(
    stack: StackProcess, c1: str, c2: str, customer: ChatUser
) -> None:
    barber = await make_user(stack, "employee")
    first = await call("POST", f"{c1}/chats/start?employee_id={barber.id}", token=customer.token)
    assert first.code == 201, first
    chat_id = first.json["chat_id"]
    gateway = stack.env["GATEWAY_PUBLIC_URL"].replace("http://", "ws://")
    assert first.json["ws_url"] == f"{gateway}/chat/chat/{chat_id}"
    again = await call("POST", f"{c2}/chats/start?employee_id={barber.id}", token=customer.token)
    assert again.code == 200, again
    assert again.json == first.json


async def test_concurrent_starts_of_one_pair_make_one_chat(
    stack: StackProcess, c1: str, c2: str, customer: ChatUser
) -> None:
    barber = await make_user(stack, "employee")
    replies = await asyncio.gather(
        *(call("POST", f"{base}/chats/start?employee_id={barber.id}", token=customer.token) for base in [c1, c2] * 5)
    )
    assert {r.code for r in replies} <= {200, 201}, replies
    assert sorted(r.code for r in replies).count(201) == 1, replies
    assert len({r.json["chat_id"] for r in replies}) == 1


@pytest.mark.parametrize(
    ("query", "code", "words"),
    [
        ("", 400, "employee_id"),
        ("?employee_id=abc", 400, "employee_id"),
        ("?employee_id=0", 400, "employee_id"),
        ("?employee_id=999999999", 404, "no user"),
    ],
)
async def test_start_rejects_bad_employee_ids(c1: str, customer: ChatUser, query: str, code: int, words: str) -> None:
    reply = await call("POST", f"{c1}/chats/start{query}", token=customer.token)
    assert reply.code == code, reply
    assert words in reply.json["detail"]


async def test_start_with_a_customer_as_employee_is_400(stack: StackProcess, c1: str, customer: ChatUser) -> None:
    other = await make_user(stack, "customer")
    reply = await call("POST", f"{c1}/chats/start?employee_id={other.id}", token=customer.token)
    assert reply.code == 400, reply
    assert "not an employee" in reply.json["detail"]


async def test_start_by_an_employee_is_403(c1: str, employee: ChatUser) -> None:
    reply = await call("POST", f"{c1}/chats/start?employee_id={employee.id}", token=employee.token)
    assert reply.code == 403, reply
    assert "customers" in reply.json["detail"]


@pytest.mark.parametrize("headers", [{}, {"Authorization": "Bearer not.a.token"}, {"Authorization": "Basic abc"}])
async def test_start_without_a_valid_token_is_401_and_x_user_is_ignored(
    c1: str, customer: ChatUser, employee: ChatUser, headers: dict
) -> None:
    reply = await call(
        "POST", f"{c1}/chats/start?employee_id={employee.id}", headers={**headers, "X-User": str(customer.id)}
    )
    assert reply.code == 401, reply
    assert reply.json["detail"]


# -- GET /chats/connect ------------------------------------------------------------------
async def test_connect_gives_participants_the_socket_url(
    stack: StackProcess, c1: str, c2: str, customer: ChatUser, employee: ChatUser
) -> None:
    chat_id = await start_chat(c1, customer, employee)
    for user in (customer, employee):
        reply = await call("GET", f"{c2}/chats/connect?id={chat_id}", token=user.token)
        assert reply.code == 200, reply
        assert reply.json["chat_id"] == chat_id
        assert reply.json["ws_url"].endswith(f"/chat/chat/{chat_id}")


async def test_connect_errors(stack: StackProcess, c1: str, customer: ChatUser, employee: ChatUser) -> None:
    chat_id = await start_chat(c1, customer, employee)
    outsider = await make_user(stack, "customer")
    reply = await call("GET", f"{c1}/chats/connect?id={chat_id}", token=outsider.token)
    assert reply.code == 403, reply
    reply = await call("GET", f"{c1}/chats/connect?id=0123456789abcdef0123456789abcdef", token=customer.token)
    assert reply.code == 404, reply
    reply = await call("GET", f"{c1}/chats/connect?id={'x' * 500}", token=customer.token)
    assert reply.code == 404, reply
    reply = await call("GET", f"{c1}/chats/connect", token=customer.token)
    assert reply.code == 400, reply
    reply = await call("GET", f"{c1}/chats/connect?id={chat_id}", headers={"X-User": str(customer.id)})
    assert reply.code == 401, reply


# -- GET /chats/history ------------------------------------------------------------------
async def test_history_pages_newest_first(stack: StackProcess, c1: str, c2: str) -> None:
    customer = await make_user(stack, "customer")
    employee = await make_user(stack, "employee")
    chat_id = await start_chat(c1, customer, employee)
    client = await ChatClient.connect(socket_url(c1, chat_id, customer.token))
    try:
        for i in range(7):
            await client.send(f"m{i}")
        await client.wait_messages(7)
    finally:
        await client.close()
    page = await call("GET", f"{c2}/chats/history?id={chat_id}&limit=3", token=employee.token)
    assert page.code == 200, page
    assert [m["seq"] for m in page.json["messages"]] == [7, 6, 5]
    assert page.json["messages"][0]["message"] == "m6"
    assert page.json["messages"][0]["sender"] == {"id": customer.id, "first_name": "Ada", "last_name": "Lovelace"}
    assert page.json["next_before"] == 5
    older = await call("GET", f"{c2}/chats/history?id={chat_id}&limit=100&before=5", token=customer.token)
    assert [m["seq"] for m in older.json["messages"]] == [4, 3, 2, 1]
    assert older.json["next_before"] is None
    default = await call("GET", f"{c2}/chats/history?id={chat_id}", token=customer.token)
    assert [m["seq"] for m in default.json["messages"]] == list(range(7, 0, -1))


@pytest.mark.parametrize(
    ("query", "code"),
    [("&limit=101", 400), ("&limit=0", 400), ("&limit=x", 400), ("&before=0", 400), ("&before=y", 400)],
)
async def test_history_rejects_bad_paging(
    c1: str, customer: ChatUser, employee: ChatUser, query: str, code: int
) -> None:
    chat_id = await start_chat(c1, customer, employee)
    reply = await call("GET", f"{c1}/chats/history?id={chat_id}{query}", token=customer.token)
    assert reply.code == code, reply
    assert reply.json["detail"]


async def test_history_refuses_outsiders_and_unknown_chats(
    stack: StackProcess, c1: str, customer: ChatUser, employee: ChatUser
) -> None:
    chat_id = await start_chat(c1, customer, employee)
    outsider = await make_user(stack, "employee")
    assert (await call("GET", f"{c1}/chats/history?id={chat_id}", token=outsider.token)).code == 403
    assert (await call("GET", f"{c1}/chats/history?id=nope", token=customer.token)).code == 404
    assert (await call("GET", f"{c1}/chats/history?id={chat_id}")).code == 401


# -- GET /chats/list/my ------------------------------------------------------------------
async def test_list_my_shows_both_sides_newest_activity_first(stack: StackProcess, c1: str, c2: str) -> None:
    customer = await make_user(stack, "customer", "Cid", "Cust")
    first = await make_user(stack, "employee", "Fay", "First")
    second = await make_user(stack, "employee", "Sam", "Second")
    chat_a = await start_chat(c1, customer, first)
    chat_b = await start_chat(c1, customer, second)

    listed = await call("GET", f"{c2}/chats/list/my", token=customer.token)
    assert listed.code == 200, listed
    assert [c["chat_id"] for c in listed.json] == [chat_b, chat_a]  # b was created last
    assert listed.json[1]["other"] == {"id": first.id, "first_name": "Fay", "last_name": "First"}
    assert listed.json[1]["last_message"] is None

    client = await ChatClient.connect(socket_url(c2, chat_a, first.token))
    try:
        await client.send("the older chat speaks")
        await client.wait_messages(1)
    finally:
        await client.close()
    listed = await call("GET", f"{c1}/chats/list/my", token=customer.token)
    assert [c["chat_id"] for c in listed.json] == [chat_a, chat_b]
    assert listed.json[0]["last_message"]["message"] == "the older chat speaks"
    assert listed.json[0]["last_message"]["sender"]["first_name"] == "Fay"

    theirs = await call("GET", f"{c1}/chats/list/my", token=first.token)
    assert [c["chat_id"] for c in theirs.json] == [chat_a]
    assert theirs.json[0]["other"] == {"id": customer.id, "first_name": "Cid", "last_name": "Cust"}
    assert (await call("GET", f"{c1}/chats/list/my")).code == 401


# -- status, metrics, unknown routes -------------------------------------------------------
async def test_status_and_metrics(c1: str, c2: str) -> None:
    for base in (c1, c2):
        body = await status(base)
        assert body["service"] == "chat" and body["status"] == "ok", body
        assert body["instance"].endswith(base.rsplit(":", 1)[1])
        assert body["authen_instances"] >= 1
        metrics = await call("GET", base + "/metrics")
        assert metrics.code == 200
        assert b'chat_user_cache_lookups_total{result="hit"}' in metrics.raw
        assert b"chat_messages_stored_total" in metrics.raw


async def test_unknown_route_is_json_404(c1: str) -> None:
    reply = await call("GET", f"{c1}/nope")
    assert reply.code == 404
    assert reply.json["detail"]


# -- the user cache ----------------------------------------------------------------------
def _metric(raw: bytes, line: str) -> float:
    for row in raw.decode().splitlines():
        if row.startswith(line + " "):
            return float(row.rsplit(" ", 1)[1])
    raise AssertionError(f"{line} not in metrics")


async def test_second_lookup_is_a_cache_hit(stack: StackProcess, c1: str, customer: ChatUser) -> None:
    barber = await make_user(stack, "employee", "Hit", "Me")
    cache = UserCache(stack.env["REDIS_CLUSTER_NODES"])
    try:
        assert await cache.get(barber.id) is None  # nobody looked them up yet
        before = (await status(c1))["cache"]
        chat_id = await start_chat(c1, customer, barber)  # looks the barber up: miss, stored
        after_first = (await status(c1))["cache"]
        assert after_first["stores"] > before["stores"]
        entry = await cache.get(barber.id)
        assert entry is not None and entry["first_name"] == "Hit" and entry["type"] == "employee"

        m_before = await call("GET", c1 + "/metrics")
        listed = await call("GET", f"{c1}/chats/list/my", token=customer.token)  # looks the barber up again
        assert any(c["chat_id"] == chat_id and c["other"]["first_name"] == "Hit" for c in listed.json)
        after_second = (await status(c1))["cache"]
        assert after_second["hits"] > after_first["hits"]
        m_after = await call("GET", c1 + "/metrics")
        hit = 'chat_user_cache_lookups_total{result="hit"}'
        assert _metric(m_after.raw, hit) > _metric(m_before.raw, hit)
    finally:
        await cache.close()


async def test_invalidate_removes_the_entry(stack: StackProcess, c1: str, customer: ChatUser) -> None:
    barber = await make_user(stack, "employee", "Gone", "Soon")
    await start_chat(c1, customer, barber)
    cache = UserCache(stack.env["REDIS_CLUSTER_NODES"])
    try:
        assert await cache.get(barber.id) is not None
        await cache.invalidate(barber.id)
        assert await cache.get(barber.id) is None
        await cache.invalidate(barber.id)  # idempotent
        # The next lookup goes to authen again, but stores nothing over the tombstone:
        # invalidation means the user is being deleted, and a lookup racing with the
        # deletion must not bring the user back into the cache.
        misses = (await status(c1))["cache"]["misses"]
        await start_chat(c1, customer, barber)
        assert (await status(c1))["cache"]["misses"] > misses
        assert await cache.get(barber.id) is None
    finally:
        await cache.close()


async def test_cache_entries_have_the_configured_ttl(stack: StackProcess, c1: str, customer: ChatUser) -> None:
    from redis.asyncio.cluster import RedisCluster

    barber = await make_user(stack, "employee")
    await start_chat(c1, customer, barber)
    host, port = stack.env["REDIS_CLUSTER_NODES"].split(",")[0].split(":")
    rc = RedisCluster(host=host, port=int(port), decode_responses=True)
    try:
        ttl = await rc.ttl(f"user:{barber.id}")
        assert 3500 < ttl <= 3600
        assert json.loads(await rc.get(f"user:{barber.id}"))["id"] == barber.id
    finally:
        await rc.aclose()
