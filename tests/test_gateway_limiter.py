"""The limiter's domain code against the stack's real Redis, without HTTP: exact shared
task counts under concurrency, per-gateway ownership that dies with its gateway, token
buckets in one round trip, and the local fallback."""

from __future__ import annotations

import asyncio
import uuid

import pytest
import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

from gateway.limiter import PREFIX, Full, Limiter, RateCharge, RateLimited
from tests.util import free_port, wait_until


@pytest.fixture
async def redis(stack):
    client = aioredis.from_url(stack.layout.redis_url)
    yield client
    await client.aclose()


def addresses(n: int = 2) -> list[str]:
    # Instance names of our own (keys only; nothing is sent to them).
    tag = uuid.uuid4().hex[:8]
    return [f"limiter-test-{tag}:{i}" for i in range(n)]


async def shared_count(redis: aioredis.Redis, instance: str) -> int:
    counts = await redis.hgetall(PREFIX + "tasks:" + instance)
    alive = 0
    for owner, n in counts.items():
        if await redis.exists(PREFIX + "alive:" + owner.decode()):
            alive += int(n)
    return alive


async def test_two_gateways_never_exceed_the_limit_together(redis, stack) -> None:
    a = Limiter(aioredis.from_url(stack.layout.redis_url), owner_ttl_ms=3000, timeout_s=1)
    b = Limiter(aioredis.from_url(stack.layout.redis_url), owner_ttl_ms=3000, timeout_s=1)
    insts = addresses(2)

    async def try_admit(lim: Limiter) -> str | None:
        try:
            return (await lim.admit(insts, limit=5)).instance
        except Full:
            return None

    results = await asyncio.gather(*(try_admit(a if i % 2 else b) for i in range(40)))
    admitted = [r for r in results if r is not None]
    assert len(admitted) == 10 and admitted.count(insts[0]) == 5 and admitted.count(insts[1]) == 5
    assert a.in_flight.get(insts[0], 0) + b.in_flight.get(insts[0], 0) == 5
    assert await shared_count(redis, insts[0]) == 5
    # Releases reach Redis without a request to carry them.
    for lim in (a, b):
        for inst, n in list(lim.in_flight.items()):
            for _ in range(n):
                lim.release(inst)
    await a.flush()
    await b.flush()
    assert await shared_count(redis, insts[0]) == 0 and await shared_count(redis, insts[1]) == 0
    assert (await a.admit(insts, limit=5)).instance == insts[0]
    assert a.round_trips < 40  # batched: fewer calls than requests
    await a.stop()
    await b.stop()


async def test_a_dead_gateways_counts_expire_with_its_ownership(redis, stack) -> None:
    dead = Limiter(aioredis.from_url(stack.layout.redis_url), owner_ttl_ms=300, timeout_s=1)
    live = Limiter(aioredis.from_url(stack.layout.redis_url), owner_ttl_ms=3000, timeout_s=1)
    inst = addresses(1)
    assert (await dead.admit(inst, limit=1)).instance == inst[0]
    with pytest.raises(Full):
        await live.admit(inst, limit=1)
    # `dead` never releases nor renews (as if killed with SIGKILL mid-request).

    async def free_again() -> bool:
        try:
            await live.admit(inst, limit=1)
            return True
        except Full:
            return False

    await wait_until(free_again, timeout=5, interval=0.05, message="the dead gateway's count expiring")
    fields = await redis.hkeys(PREFIX + "tasks:" + inst[0])
    assert dead.gateway_id.encode() not in fields  # its share was removed, not just ignored
    await live.stop()
    await dead.redis.aclose()


async def test_least_outstanding_uses_shared_counts(stack) -> None:
    a = Limiter(aioredis.from_url(stack.layout.redis_url), owner_ttl_ms=3000, timeout_s=1)
    b = Limiter(aioredis.from_url(stack.layout.redis_url), owner_ttl_ms=3000, timeout_s=1)
    insts = addresses(2)
    assert (await a.admit(insts, limit=10, least_outstanding=True)).instance == insts[0]
    # b holds nothing itself, yet sees a's request on insts[0].
    assert (await b.admit(insts, limit=10, least_outstanding=True)).instance == insts[1]
    assert (await b.admit(insts, limit=10, least_outstanding=True)).instance == insts[0]
    await a.stop()
    await b.stop()


async def test_token_bucket_in_the_same_round_trip(stack) -> None:
    lim = Limiter(aioredis.from_url(stack.layout.redis_url), owner_ttl_ms=3000, timeout_s=1)
    insts = addresses(1)
    charge = RateCharge(f"test:{uuid.uuid4().hex}", rate_per_s=0.5, burst=3)
    for _ in range(3):
        adm = await lim.admit(insts, limit=100, charge=charge)
        lim.release(adm.instance)
    with pytest.raises(RateLimited) as e:
        await lim.admit(insts, limit=100, charge=charge)
    assert 0 < e.value.retry_after_s <= 2.0
    before = lim.round_trips
    with pytest.raises(RateLimited):
        await lim.admit(insts, limit=100, charge=charge)
    assert lim.round_trips == before + 1
    await lim.stop()


async def test_redis_unreachable_falls_back_to_local_limits_and_fails_open(stack) -> None:
    # A Redis URL where nothing listens: the same code path as a Redis that went down.
    nowhere = aioredis.from_url(
        f"redis://127.0.0.1:{free_port()}/0", socket_connect_timeout=0.5, retry=Retry(NoBackoff(), 0)
    )
    lim = Limiter(nowhere, owner_ttl_ms=3000, timeout_s=0.5)
    insts = addresses(2)
    charge = RateCharge("unused", rate_per_s=0.001, burst=1)
    got = [(await lim.admit(insts, limit=1, charge=charge)).instance for _ in range(2)]
    assert sorted(got) == sorted(insts) and not lim.redis_ok
    with pytest.raises(Full):
        await lim.admit(insts, limit=1, charge=charge)  # limits still hold, locally
    lim.release(insts[0])
    assert (await lim.admit(insts, limit=1, charge=charge)).instance == insts[0]  # rate limit fails open
    await lim.stop()
    await nowhere.aclose()


async def test_local_scope_counts_per_gateway_but_rate_limits_shared(redis, stack) -> None:
    a = Limiter(aioredis.from_url(stack.layout.redis_url), owner_ttl_ms=3000, timeout_s=1, shared=False)
    b = Limiter(aioredis.from_url(stack.layout.redis_url), owner_ttl_ms=3000, timeout_s=1, shared=False)
    insts = addresses(1)
    before = a.round_trips
    assert (await a.admit(insts, limit=1)).instance == insts[0]
    with pytest.raises(Full):
        await a.admit(insts, limit=1)
    assert (await b.admit(insts, limit=1)).instance == insts[0]  # b counts only its own
    assert a.round_trips == before  # no Redis on the hot path without a rate limit
    charge = RateCharge(f"test:{uuid.uuid4().hex}", rate_per_s=0.5, burst=1)
    a.release(insts[0])
    assert (await a.admit(insts, limit=1, charge=charge)).instance == insts[0]
    a.release(insts[0])
    with pytest.raises(RateLimited):
        await b.admit(insts, limit=5, charge=charge)  # the bucket is shared through Redis
    # Counts are still published, for /status and for shared-scope gateways.
    await b.flush()
    assert await shared_count(redis, insts[0]) == 1
    await a.stop()
    await b.stop()
