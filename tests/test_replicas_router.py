"""replicas.ReadWriteRouter used directly (no HTTP) against the stack's PostgreSQL and Redis."""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import AsyncIterator

import pytest
from redis.asyncio import Redis
from sqlalchemy import text
from sqlalchemy.exc import ProgrammingError
from sqlalchemy.ext.asyncio import AsyncConnection

from replicas import HighWaterMark, PrimaryUnavailable, ReadWriteRouter
from replicas.hwm import encode_lsn
from tests.stackproc import StackProcess
from tests.test_authen_support import replay_paused
from tests.util import free_port, wait_until

SCHEMA = "replicas_test"


@pytest.fixture
def hwm_key() -> str:
    return f"test:hwm:{uuid.uuid4().hex}"


@pytest.fixture
async def redis(stack: StackProcess) -> AsyncIterator[Redis]:
    client = Redis.from_url(stack.layout.redis_url)
    yield client
    await client.aclose()


def make_router(
    stack: StackProcess,
    redis: Redis | None,
    key: str,
    *,
    replicas: list[str] | None = None,
    primary: str | None = None,
    check_interval_s: float = 0.1,
) -> ReadWriteRouter:
    lay = stack.layout
    return ReadWriteRouter(
        primary or lay.pg_url("authen", 0),
        replicas if replicas is not None else [lay.pg_url("authen", 1), lay.pg_url("authen", 2)],
        redis=redis,
        hwm_key=key,
        check_interval_s=check_interval_s,
    )


@pytest.fixture
async def router(stack: StackProcess, redis: Redis, hwm_key: str) -> AsyncIterator[ReadWriteRouter]:
    r = make_router(stack, redis, hwm_key)
    await r.start()
    await r.write(lambda c: _exec(c, f"CREATE SCHEMA IF NOT EXISTS {SCHEMA}"))
    await r.write(lambda c: _exec(c, f"CREATE TABLE IF NOT EXISTS {SCHEMA}.probe (id text PRIMARY KEY)"))
    yield r
    await r.close()


async def _exec(conn: AsyncConnection, sql: str, **params: object) -> None:
    await conn.execute(text(sql), params)


async def _insert(conn: AsyncConnection, key: str) -> None:
    await conn.execute(text(f"INSERT INTO {SCHEMA}.probe VALUES (:k)"), {"k": key})


def _finder(key: str):
    async def find(conn: AsyncConnection) -> str | None:
        return (await conn.execute(text(f"SELECT id FROM {SCHEMA}.probe WHERE id = :k"), {"k": key})).scalar()

    return find


# -- replica lag -----------------------------------------------------------------------------
@pytest.mark.unit
async def test_lag_is_dated_by_the_primary_samples_unless_the_gap_predates_them() -> None:
    r = ReadWriteRouter("postgresql://barber@127.0.0.1:1/authen", ["postgresql://barber@127.0.0.1:2/authen"])
    try:
        now = 1000.0
        r.primary.lsn = 1000
        r._samples.extend([(now - 30, 500), (now - 10, 900), (now - 2, 1000)])
        replica = r.replicas[0]
        replica.healthy = True
        # Replaying a record on a quiet primary: its own estimate is the idle time since the last commit.
        replica.reported_lag_s = 40.0
        for lsn, lag in ((1000, 0.0), (950, 2.0), (900, 2.0), (899, 10.0), (400, 40.0)):
            replica.lsn = lsn
            r._derive_lag(replica, now)
            assert replica.lag_s == lag, (lsn, replica.lag_s)
        assert replica.lagging  # 40 s, past the 5 s limit
        replica.lsn = 950
        r._derive_lag(replica, now)
        assert not replica.lagging and replica.lag_bytes == 50
    finally:
        await r.close()


# -- the high-water mark ----------------------------------------------------------------------
async def test_high_water_mark_only_rises(redis: Redis, hwm_key: str) -> None:
    one, two = HighWaterMark(redis, hwm_key), HighWaterMark(redis, hwm_key)
    assert await one.current() is None  # never written: unknown
    await one.publish(0x1_0000_0500)
    await two.publish(0x500)  # another instance, behind: must not lower the mark
    assert await two.current() == 0x1_0000_0500
    assert await redis.get(hwm_key) == encode_lsn(0x1_0000_0500).encode()
    await two.publish(2**63 + 5)  # beyond a double's precision: still exact
    assert await one.current() == 2**63 + 5
    await redis.delete(hwm_key)


@pytest.mark.unit
async def test_high_water_mark_without_redis_is_unknown_and_kept_for_later(hwm_key: str) -> None:
    dead = Redis(host="127.0.0.1", port=free_port(), socket_connect_timeout=0.5, socket_timeout=0.5)
    mark = HighWaterMark(dead, hwm_key)
    await mark.publish(1234)  # never raises
    assert mark.pending == 1234 and mark.local == 1234
    assert await mark.current() is None
    assert not mark.available
    await dead.aclose()


# -- routing ----------------------------------------------------------------------------------
async def test_reads_go_to_replicas_once_they_replayed_the_mark(router: ReadWriteRouter) -> None:
    key = uuid.uuid4().hex
    await router.write(lambda c: _insert(c, key))

    async def served_by_replica() -> bool:
        before = sum(r.reads for r in router.replicas)
        assert await router.read(_finder(key)) == key
        return sum(r.reads for r in router.replicas) > before

    await wait_until(served_by_replica, timeout=15, message="a replica serving the read")


async def test_a_write_is_read_back_through_another_router_while_replay_is_paused(
    stack: StackProcess, redis: Redis, hwm_key: str, router: ReadWriteRouter
) -> None:
    other = make_router(stack, Redis.from_url(stack.layout.redis_url), hwm_key)
    await other.start()
    try:
        async with replay_paused(stack):
            key = uuid.uuid4().hex
            await router.write(lambda c: _insert(c, key))
            primary_before = other.primary.reads
            assert await other.read(_finder(key)) == key
            assert other.primary.reads == primary_before + 1
    finally:
        await other.close()


async def test_redis_down_sends_reads_to_the_primary(stack: StackProcess, hwm_key: str) -> None:
    dead = Redis(host="127.0.0.1", port=free_port(), socket_connect_timeout=0.5, socket_timeout=0.5)
    r = make_router(stack, dead, hwm_key)
    await r.start()
    try:
        key = uuid.uuid4().hex
        await r.write(lambda c: _exec(c, f"CREATE SCHEMA IF NOT EXISTS {SCHEMA}"))
        await r.write(lambda c: _exec(c, f"CREATE TABLE IF NOT EXISTS {SCHEMA}.probe (id text PRIMARY KEY)"))
        await r.write(lambda c: _insert(c, key))
        for _ in range(3):
            assert await r.read(_finder(key)) == key
        assert r.primary.reads == 3 and all(n.reads == 0 for n in r.replicas)
        assert r.view()["high_water_mark_store"] == "unavailable"
    finally:
        await r.close()
        await dead.aclose()


async def test_unreachable_replica_is_skipped(stack: StackProcess, redis: Redis, hwm_key: str) -> None:
    lay = stack.layout
    dead_url = f"postgresql+psycopg://barber@127.0.0.1:{free_port()}/authen"
    r = make_router(stack, redis, hwm_key, replicas=[dead_url, lay.pg_url("authen", 2)])
    await r.start()
    try:
        assert r.replicas[0].healthy is False and r.replicas[0].last_error
        await r.write(lambda c: _exec(c, "SELECT 1"))
        await wait_until(lambda: r.fresh_replicas(r.hwm.local) == [r.replicas[1]], timeout=10)
        for _ in range(4):
            assert await r.read(lambda c: _scalar(c, "SELECT 1")) == 1
        assert r.replicas[1].reads == 4 and r.replicas[0].reads == 0
    finally:
        await r.close()


async def _scalar(conn: AsyncConnection, sql: str) -> object:
    return (await conn.execute(text(sql))).scalar()


async def test_dead_primary_refuses_writes_and_replicas_still_read(
    stack: StackProcess, redis: Redis, hwm_key: str
) -> None:
    # The primary URL points at nothing: writes 503, reads served by the replicas.
    r = make_router(stack, redis, hwm_key, primary=f"postgresql+psycopg://barber@127.0.0.1:{free_port()}/authen")
    await r.start()
    try:
        with pytest.raises(PrimaryUnavailable) as err:
            await r.write(lambda c: _exec(c, "SELECT 1"))
        assert err.value.status_code == 503 and "primary" in err.value.detail
        assert await r.read(lambda c: _scalar(c, "SELECT 1")) == 1
        assert sum(n.reads for n in r.replicas) == 1
    finally:
        await r.close()


async def test_a_restarted_primary_is_read_again_before_any_monitor_sees_it_back(
    stack: StackProcess, redis: Redis, hwm_key: str, router: ReadWriteRouter
) -> None:
    """Routers whose monitors do not look again after their first round stand for the
    moment after a restart before the next probe: ``writer`` and ``saw_outage`` saw the
    primary fail, ``idle`` holds a pooled connection to it from before the restart. With
    replay paused, none of them may read a fresh write anywhere but on the primary."""
    routers = [make_router(stack, redis, hwm_key, check_interval_s=3600) for _ in range(3)]
    writer, saw_outage, idle = routers
    for r in routers:
        await r.start()
    try:
        before = uuid.uuid4().hex
        await writer.write(lambda c: _insert(c, before))
        # Their views of the replicas predate the write: these reads pool a primary connection.
        for r in (saw_outage, idle):
            assert await r.read(_finder(before)) == before and r.primary.reads == 1
        await wait_until(
            lambda: len(router.fresh_replicas(writer.hwm.local)) == 2,
            timeout=15,
            message="both replicas replayed the first write",
        )
        async with replay_paused(stack):
            await asyncio.to_thread(stack.control.stop, "postgres-primary")
            try:
                for r in (writer, saw_outage):
                    assert await r.read(_finder(before)) == before  # a degraded read, from a replica
                    assert r.primary.healthy is False and r.degraded_reads == 1
            finally:
                await asyncio.to_thread(stack.control.start, "postgres-primary")
            key = uuid.uuid4().hex
            await writer.write(lambda c: _insert(c, key))
            assert writer.primary.healthy
            for r in routers:
                assert await r.read(_finder(key)) == key, f"router {routers.index(r)} read a replica behind the mark"
            assert all(r.degraded_reads <= 1 for r in routers)
    finally:
        for r in routers:
            await r.close()


async def test_a_write_whose_position_cannot_be_read_is_still_read_back_everywhere(
    stack: StackProcess, redis: Redis, hwm_key: str, router: ReadWriteRouter, caplog: pytest.LogCaptureFixture
) -> None:
    """The position query after a commit fails (a real error from the server, on this
    connection and on a new one): the write stands, its writer reads from the primary,
    and its monitor publishes a position past the commit for every other instance."""
    writer = make_router(stack, redis, hwm_key)
    await writer.start()
    try:
        async with replay_paused(stack):
            writer.write_position_sql = text("SELECT no_such_position_function()")
            key = uuid.uuid4().hex
            with caplog.at_level(logging.WARNING, logger="barber.replicas"):
                await writer.write(lambda c: _insert(c, key))
            assert "still unreadable" in caplog.text
            assert await writer.read(_finder(key)) == key
            # ``router`` (another instance) learns of the write from the mark alone.
            await wait_until(
                lambda: _reads_back(router, key),
                timeout=10,
                message="the other router reading the write back (replay paused)",
            )
    finally:
        await writer.close()


async def _reads_back(router: ReadWriteRouter, key: str) -> bool:
    return await router.read(_finder(key)) == key


async def test_statement_errors_are_not_retried_elsewhere(router: ReadWriteRouter) -> None:
    before = {n.name: n.reads for n in router.nodes}
    with pytest.raises(ProgrammingError):
        await router.read(lambda c: _scalar(c, "SELECT * FROM no_such_table_anywhere"))
    assert {n.name: n.reads for n in router.nodes} == before
    assert all(n.healthy for n in router.nodes)


async def test_read_only_primary_refuses_writes_with_503(stack: StackProcess, redis: Redis, hwm_key: str) -> None:
    # A "primary" that is really a standby: the write fails as read-only, mapped to 503.
    lay = stack.layout
    r = make_router(stack, redis, hwm_key, primary=lay.pg_url("authen", 1), replicas=[])
    try:
        with pytest.raises(PrimaryUnavailable, match="read-only"):
            await r.write(lambda c: _exec(c, f"CREATE SCHEMA IF NOT EXISTS {SCHEMA}_nope"))
    finally:
        await r.close()
