"""chat under faults, against the real stack: a chat instance killed with -9 while clients
are connected, the Redis Cluster master holding a user's cache entry killed, and the
standalone Redis (pub/sub) taken away. Each test restores what it broke."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from collections.abc import Awaitable

import pytest
from redis.asyncio import Redis
from redis.asyncio.cluster import ClusterNode, RedisCluster
from tornado.httpclient import HTTPClientError
from tornado.websocket import WebSocketClosedError, WebSocketError

from chat.cache import CacheError, UserCache, parse_nodes
from tests.http import call
from tests.stackproc import StackProcess
from tests.test_chat_support import ChatClient, ChatUser, make_user, socket_url, start_chat, status
from tests.util import wait_until


def _has_process(stack: StackProcess, name: str) -> bool:
    return name in stack.control.status()["processes"]


async def _healthy(base: str) -> bool:
    return (await call("GET", base + "/utilities/status", timeout=2)).code == 200


# -- kill -9 of a chat instance ------------------------------------------------------------
class Participant:
    """A client that survives its instance dying: it reconnects through the gateway with
    ``since`` and resends, with the same client_id, whatever it has not seen echoed."""

    def __init__(self, user: ChatUser, chat_id: str, prefix: str) -> None:
        self.user = user
        self.chat_id = chat_id
        self.prefix = prefix
        self.client: ChatClient | None = None
        self.connections: list[ChatClient] = []
        self.sent: list[str] = []

    @property
    def received(self) -> list[dict]:
        return [m for c in self.connections for m in c.messages]

    @property
    def last_seq(self) -> int:
        msgs = self.received
        return msgs[-1]["seq"] if msgs else 0

    def seen_ids(self) -> set[str]:
        return {m.get("client_id") for m in self.received}

    async def connect(self, base: str, via_gateway: bool) -> None:
        url = socket_url(base, self.chat_id, self.user.token, since=self.last_seq, via_gateway=via_gateway)
        client = await ChatClient.connect(url)
        self.client = client
        self.connections.append(client)

    async def reconnect_via(self, gateway: str, timeout: float = 60.0) -> None:
        async def attempt() -> bool:
            try:
                await self.connect(gateway, via_gateway=True)
            except (OSError, HTTPClientError, WebSocketError):
                return False
            # Connected to a live instance: it must not close us straight away.
            assert self.client is not None
            try:
                await asyncio.wait_for(asyncio.shield(self.client.closed.wait()), 0.3)
            except TimeoutError:
                return True
            return False

        await wait_until(attempt, timeout=timeout, interval=0.2, message=f"{self.prefix} reconnected")
        for cid in self.sent:
            if cid not in self.seen_ids():
                await self.client.send(f"{self.prefix} message {cid}", client_id=cid)  # type: ignore[union-attr]

    async def send(self, n: int, wait_echo: bool = True) -> None:
        for _ in range(n):
            cid = f"{self.prefix}-{len(self.sent)}"
            self.sent.append(cid)
            assert self.client is not None
            try:
                await self.client.send(f"{self.prefix} message {cid}", client_id=cid)
            except WebSocketClosedError:
                return
            if wait_echo:
                await wait_until(lambda: cid in self.seen_ids(), timeout=10, message=f"echo of {cid}")


async def test_kill_9_of_a_chat_instance_loses_and_duplicates_nothing(stack: StackProcess, c1: str, c2: str) -> None:
    if not _has_process(stack, "gateway"):
        pytest.skip("needs the gateway in the stack (clients reconnect through it)")
    gateway = stack.url("gateway")
    customer = await make_user(stack, "customer", "Kim", "Killed")
    employee = await make_user(stack, "employee", "Sue", "Survivor")
    chat_id = await start_chat(c1, customer, employee)
    cust = Participant(customer, chat_id, "c")
    empl = Participant(employee, chat_id, "e")
    await cust.connect(c1, via_gateway=False)  # on the instance about to die
    await empl.connect(c2, via_gateway=False)
    await cust.send(4)
    await empl.send(4)

    old_pid = stack.control.pid("chat-1")
    assert old_pid
    await cust.send(3, wait_echo=False)  # in flight when the instance dies
    os.kill(old_pid, signal.SIGKILL)
    assert cust.client is not None
    assert await cust.client.wait_closed(10) != 1000  # an abrupt end, not a normal close
    await empl.send(3)  # the survivor keeps talking meanwhile

    await cust.reconnect_via(gateway)
    await cust.send(3)
    await empl.send(2)

    total = len(cust.sent) + len(empl.sent)
    for p in (cust, empl):
        await wait_until(
            lambda p=p: len(p.received) >= total, timeout=30, message=f"{p.prefix} has all {total} messages"
        )
        seqs = [m["seq"] for m in p.received]
        assert seqs == list(range(1, total + 1)), seqs  # nothing lost, nothing twice, in order
        assert sorted(m["client_id"] for m in p.received) == sorted(cust.sent + empl.sent)
    history = await call("GET", f"{c2}/chats/history?id={chat_id}&limit=100", token=customer.token)
    stored = history.json["messages"]
    assert sorted(m["seq"] for m in stored) == list(range(1, total + 1))
    assert sorted(m["client_id"] for m in stored) == sorted(cust.sent + empl.sent)

    for p in (cust, empl):
        for c in p.connections:
            await c.close()
    # The supervisor brings chat-1 back.
    await wait_until(lambda: stack.control.pid("chat-1") not in (None, old_pid), timeout=60, message="chat-1 restarted")
    await wait_until(lambda: _healthy(c1), timeout=60, message="chat-1 healthy")


# -- the cache master killed ------------------------------------------------------------------
async def _cluster_recovered(stack: StackProcess) -> bool:
    for node in parse_nodes(stack.env["REDIS_CLUSTER_NODES"]):
        r = Redis(host=node.host, port=node.port, socket_timeout=1, decode_responses=True)
        try:
            info = await r.cluster("info")
            text = info if isinstance(info, str) else "\n".join(f"{k}:{v}" for k, v in info.items())
            if "cluster_state:ok" not in text or "cluster_slots_ok:16384" not in text:
                return False
            nodes = await r.execute_command("CLUSTER", "NODES")
            raw = nodes if isinstance(nodes, str) else str(nodes)
            if "fail" in raw or "disconnected" in raw:
                return False
        finally:
            await r.aclose()
    return True


async def test_cache_master_killed_lookups_still_succeed(stack: StackProcess, c1: str, c2: str) -> None:
    customer = await make_user(stack, "customer")
    employee = await make_user(stack, "employee", "Cache", "Master")
    chat_id = await start_chat(c1, customer, employee)  # caches the employee's entry

    key = f"user:{employee.id}"
    seeds = parse_nodes(stack.env["REDIS_CLUSTER_NODES"])
    rc = RedisCluster(startup_nodes=[ClusterNode(n.host, n.port) for n in seeds], decode_responses=True)
    try:
        assert await rc.get(key) is not None
        slot = await rc.cluster_keyslot(key)
        owner = rc.nodes_manager.get_node_from_slot(slot)
        port = int(owner.port)
    finally:
        await rc.aclose()
    name = f"redis-cluster-{stack.layout.ports('redis_cluster').index(port) + 1}"
    pid = stack.control.pid(name)
    assert pid

    async def lookups_work() -> None:
        for base in (c1, c2):
            listed = await call("GET", f"{base}/chats/list/my", token=customer.token)
            assert listed.code == 200, listed
            mine = [c for c in listed.json if c["chat_id"] == chat_id]
            assert mine and mine[0]["other"]["first_name"] == "Cache", listed
        client = await ChatClient.connect(socket_url(c2, chat_id, employee.token))
        try:
            await client.send("still here")
            msgs = await client.wait_messages(1)
            assert msgs[-1]["sender"] == {"id": employee.id, "first_name": "Cache", "last_name": "Master"}
        finally:
            await client.close()

    errors_before = (await status(c1))["cache"]["errors"]
    os.kill(pid, signal.SIGKILL)
    try:
        # Right away (the master is down, no replica promoted yet) and through the failover.
        await lookups_work()
        assert (await status(c1))["cache"]["errors"] > errors_before  # the cache really was away
        deadline = time.monotonic() + 8
        while time.monotonic() < deadline:
            await lookups_work()
    finally:
        # The supervisor restarts the node; it rejoins as a replica of the promoted one.
        await wait_until(lambda: stack.control.pid(name) not in (None, pid), timeout=60, message=f"{name} restarted")
        await wait_until(lambda: _cluster_recovered(stack), timeout=90, interval=0.5, message="the cluster healed")
    # And the cache serves hits again once the cluster is whole.
    hits = (await status(c1))["cache"]["hits"]

    async def hit_again() -> bool:
        await call("GET", f"{c1}/chats/list/my", token=customer.token)
        return (await status(c1))["cache"]["hits"] > hits

    await wait_until(hit_again, timeout=30, interval=0.5, message="cache hits after recovery")


async def test_invalidation_counts_only_once_a_replica_has_it(stack: StackProcess) -> None:
    """An invalidation that only the master holds could come back undone through a
    failover, so it is confirmed only once a replica has it (WAIT); with the shard's
    replica down it is refused (the deletion retries), and it succeeds once it is back."""
    user = await make_user(stack, "customer")
    key = f"user:{user.id}"
    seeds = parse_nodes(stack.env["REDIS_CLUSTER_NODES"])
    rc = RedisCluster(startup_nodes=[ClusterNode(n.host, n.port) for n in seeds], decode_responses=True)
    try:
        slot = await rc.cluster_keyslot(key)
        master = int(rc.nodes_manager.get_node_from_slot(slot).port)
    finally:
        await rc.aclose()

    async def replication() -> dict:
        r = Redis(host="127.0.0.1", port=master, socket_timeout=1, decode_responses=True)
        try:
            return await r.info("replication")
        finally:
            await r.aclose()

    async def connected_replicas() -> int:
        return int((await replication())["connected_slaves"])

    info = await replication()
    assert info["role"] == "master" and int(info["connected_slaves"]) == 1, info
    replica = int(info["slave0"]["port"])
    ports = stack.layout.ports("redis_cluster")
    replica_name = f"redis-cluster-{ports.index(replica) + 1}"

    cache = UserCache(stack.env["REDIS_CLUSTER_NODES"])
    stack.control.stop(replica_name)
    try:
        await wait_until(lambda: _eq(connected_replicas(), 0), timeout=30, message="the replica gone")
        with pytest.raises(CacheError):
            await cache.invalidate(user.id)
    finally:
        stack.control.start(replica_name)
    try:
        await wait_until(lambda: _cluster_recovered(stack), timeout=90, interval=0.5, message="the cluster healed")
        await wait_until(lambda: _eq(connected_replicas(), 1), timeout=30, message="the replica back")

        async def invalidated() -> bool:
            try:
                await cache.invalidate(user.id)
            except CacheError:
                return False  # e.g. the replica still resynchronising
            return True

        await wait_until(invalidated, timeout=30, interval=0.5, message="invalidation confirmed by the replica")
        assert await cache.get(user.id) is None
    finally:
        await cache.close()


async def _eq(value: Awaitable[int], expected: int) -> bool:
    return await value == expected


async def test_whole_cache_cluster_down_lookups_still_succeed(stack: StackProcess, c1: str, c2: str) -> None:
    customer = await make_user(stack, "customer")
    names = [f"redis-cluster-{i + 1}" for i in range(len(stack.layout.ports("redis_cluster")))]
    for name in names:
        stack.control.stop(name)
    try:
        for base in (c1, c2):
            # Fresh users: nothing cached anywhere, every lookup goes to authen.
            employee = await make_user(stack, "employee", "No", "Cache")
            chat_id = await start_chat(base, customer, employee)
            listed = await call("GET", f"{base}/chats/list/my", token=customer.token)
            assert listed.code == 200, listed
            assert [c["other"]["first_name"] for c in listed.json if c["chat_id"] == chat_id] == ["No"]
            client = await ChatClient.connect(socket_url(base, chat_id, employee.token))
            try:
                await client.send("no cache needed")
                assert (await client.wait_messages(1))[0]["sender"]["last_name"] == "Cache"
            finally:
                await client.close()
            body = await status(base)
            assert body["cache"]["errors"] >= 1 and body["cache"]["last_error"]
    finally:
        for name in names:
            stack.control.start(name)
        await wait_until(lambda: _cluster_recovered(stack), timeout=90, interval=0.5, message="the cluster healed")
    for base in (c1, c2):
        hits = (await status(base))["cache"]["hits"]

        async def hit_again(base: str = base, hits: int = hits) -> bool:
            await call("GET", f"{base}/chats/list/my", token=customer.token)
            return (await status(base))["cache"]["hits"] > hits

        await wait_until(hit_again, timeout=30, interval=0.5, message=f"cache hits again on {base}")


# -- Redis (pub/sub) away --------------------------------------------------------------------
async def test_redis_outage_delays_delivery_but_loses_nothing(stack: StackProcess, c1: str, c2: str) -> None:
    customer = await make_user(stack, "customer")
    employee = await make_user(stack, "employee")
    chat_id = await start_chat(c1, customer, employee)
    a = await ChatClient.connect(socket_url(c1, chat_id, customer.token))
    b = await ChatClient.connect(socket_url(c2, chat_id, employee.token))
    try:
        await a.send("before")
        await b.wait_messages(1)
        stack.control.stop("redis")
        try:
            for i in range(5):
                await a.send(f"during {i}")
            await a.wait_messages(6)  # stored and delivered locally at once
            # chat-2 gets them from MongoDB without pub/sub.
            await b.wait_messages(6, timeout=30)
            assert b.seqs == list(range(1, 7))
        finally:
            stack.control.start("redis")
        await wait_until(lambda: _pubsub_back(c1, c2), timeout=30, message="pub/sub reconnected")
        await b.send("after")
        await a.wait_messages(7, timeout=20)
        await b.wait_messages(7, timeout=20)
        assert a.seqs == b.seqs == list(range(1, 8))
    finally:
        await a.close()
        await b.close()


async def _pubsub_back(*bases: str) -> bool:
    for base in bases:
        body = await status(base)
        if not body["pubsub_connected"]:
            return False
    return True
