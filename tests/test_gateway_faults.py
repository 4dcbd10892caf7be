"""Faults, against real processes: an authen instance killed with SIGKILL, discovery
restarted, Redis stopped and restarted, a gateway killed mid-request. Each test brings
back what it took away."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import time

import aiohttp
import pytest
import redis.asyncio as aioredis

from gateway.limiter import PREFIX
from tests.test_gateway_support import (
    Stream,
    authen_addresses,
    fetch,
    gateway_instances,
    gateway_status,
    log_events,
    start_gateway,
    wait_routed,
)
from tests.util import wait_until


async def test_killed_instance_breaker_opens_no_client_error_and_it_returns(stack, http) -> None:
    victim = authen_addresses(stack)[0]
    async with await start_gateway(stack, breaker_open_ms=500, breaker_open_max_ms=2000) as g:
        await wait_routed(http, g.url, "authen", 2)
        stream = Stream(http, g.url + "/authen/utilities/status").start()
        await wait_until(lambda: stream.served_by(victim) >= 5, timeout=10, message="traffic on both instances")
        pid = await asyncio.to_thread(stack.control.pid, "authen-1")
        killed_at = time.monotonic()
        os.kill(pid, signal.SIGKILL)
        try:

            async def opened() -> bool:
                metrics = (await fetch(http, "GET", g.url + "/metrics")).body.decode()
                return (
                    f'gateway_breaker_transitions_total{{from_state="closed",instance="{victim}",to_state="open"}}'
                    in metrics
                )

            await wait_until(opened, timeout=15, message="the breaker of the killed instance opening")
            opened_at = time.monotonic()
            # The supervisor restarts it; the breaker lets it back in by itself.
            await wait_until(
                lambda: stream.served_by(victim, since=opened_at) >= 3,
                timeout=60,
                message="the restarted instance serving again",
            )
        finally:
            await stream.stop()
        assert stream.errors(since=opened_at) == []
        # GETs were retried on the other instance even before the breaker opened.
        assert stream.errors(since=killed_at) == [], stream.errors(since=killed_at)[:5]
        assert len(stream.results) > 20
        assert (await gateway_instances(http, g.url))[victim]["breaker"]["state"] in ("closed", "half_open")
    status = await asyncio.to_thread(stack.control.status)
    assert status["processes"]["authen-1"]["state"] == "running"
    assert status["processes"]["authen-1"]["pid"] not in (None, pid)


async def test_discovery_restarted_routing_continues(stack, http) -> None:
    gw = stack.url("gateway")
    await wait_routed(http, gw, "authen", 2)
    stream = Stream(http, gw + "/authen/utilities/status").start()
    try:
        await asyncio.to_thread(stack.control.stop, "discovery")
        try:

            async def unreachable() -> bool:
                return not (await gateway_status(http, gw))["services"]["authen"]["discovery"]["reachable"]

            await wait_until(unreachable, timeout=15, message="the gateway noticing discovery is down")
            down_at = time.monotonic()
            # Routing goes on with the last view, to both instances.
            await wait_until(
                lambda: all(stream.served_by(a, since=down_at) >= 3 for a in authen_addresses(stack)),
                timeout=15,
                message="both instances served while discovery is down",
            )
        finally:
            await asyncio.to_thread(stack.control.start, "discovery")

        async def back() -> bool:
            st = (await fetch(http, "GET", stack.url("discovery") + "/services/authen")).json
            view = (await gateway_status(http, gw))["services"]["authen"]
            return len(st["instances"]) == 2 and view["discovery"]["reachable"] and len(view["instances"]) == 2

        await wait_until(back, timeout=30, message="instances re-registered and the gateway's view live again")
        restarted_at = time.monotonic()
        await wait_until(
            lambda: all(stream.served_by(a, since=restarted_at) >= 3 for a in authen_addresses(stack)),
            timeout=15,
            message="both instances served after the restart",
        )
    finally:
        await stream.stop()
    assert stream.errors() == [], stream.errors()[:5]


async def test_redis_stopped_and_restarted(stack, http) -> None:
    gw = stack.url("gateway")
    rules = json.dumps([{"path": "/authen/utilities/status", "rate_per_s": 0.1, "burst": 4}])
    async with await start_gateway(stack, rate_limits=rules) as g:
        await wait_routed(http, g.url, "authen", 2)
        statuses = [(await fetch(http, "GET", g.url + "/authen/utilities/status")).status for _ in range(5)]
        assert statuses == [200] * 4 + [429]
        stream = Stream(http, gw + "/authen/utilities/status").start()
        try:
            await asyncio.to_thread(stack.control.stop, "redis")
            try:
                # Proxying goes on; limits are local; rate limiting fails open and says so.
                statuses = [(await fetch(http, "GET", g.url + "/authen/utilities/status")).status for _ in range(8)]
                assert statuses == [200] * 8
                st = await gateway_status(http, g.url)
                assert st["limits"] == "local" and st["redis"] == "unavailable"

                def said_so() -> bool:
                    return any("rate limiting fails open" in e.get("message", "") for e in log_events(g))

                await wait_until(said_so, timeout=10, message="the fail-open log line")
                down = [e for e in log_events(g) if "rate limiting fails open" in e.get("message", "")]
                assert len(down) == 1 and down[0]["log.level"] == "error"  # once per outage, not per request
            finally:
                await asyncio.to_thread(stack.control.start, "redis")

            async def shared_again() -> bool:
                return (await gateway_status(http, g.url))["limits"] == "shared"

            await wait_until(shared_again, timeout=15, message="limits shared through Redis again")
            # The restarted Redis is empty: registrations come back as instances heartbeat.
            await wait_until(lambda: _registered(stack, 2), timeout=30, message="authen re-registered")
            # Rate limiting is on again (the bucket started over, full).
            statuses = [(await fetch(http, "GET", g.url + "/authen/utilities/status")).status for _ in range(5)]
            assert statuses == [200] * 4 + [429]
            restarted_at = time.monotonic()
            await wait_until(
                lambda: all(stream.served_by(a, since=restarted_at) >= 3 for a in authen_addresses(stack)),
                timeout=15,
                message="both instances served after the restart",
            )
        finally:
            await stream.stop()
        # The stack's gateway never failed a request across the outage.
        assert stream.errors() == [], stream.errors()[:5]


async def _registered(stack, n: int) -> bool:
    async with aiohttp.ClientSession() as s:
        r = await fetch(s, "GET", stack.url("discovery") + "/services/authen")
        return r.status == 200 and len(r.json["instances"]) == n


async def test_gateway_killed_mid_request_leaks_no_count(stack, http) -> None:
    redis = aioredis.from_url(stack.layout.redis_url)
    try:
        # Gateway A holds a slot on both instances (limit 1), with a long ownership TTL;
        # gateway B, already running, shares the counts through Redis.
        a = await start_gateway(stack, task_limit_per_service=1, timeout_ms=40000, limiter_owner_ttl_ms=10000)
        b = await start_gateway(stack, task_limit_per_service=1)
        try:
            await wait_routed(http, a.url, "authen", 2)
            await wait_routed(http, b.url, "authen", 2)
            a_id = (await gateway_status(http, a.url))["gateway_id"]
            sleepers = [
                asyncio.create_task(fetch(http, "GET", a.url + "/authen/utilities/sleepy?seconds=30")) for _ in range(2)
            ]

            async def both_held() -> bool:
                return all(i["in_flight"] == 1 for i in (await gateway_instances(http, a.url)).values())

            await wait_until(both_held, timeout=5, message="a sleepy in flight on each instance")
            a.kill(signal.SIGKILL)
            killed_at = time.monotonic()
            await a.wait_exit(10)
            for t in sleepers:
                with pytest.raises((aiohttp.ClientError, TimeoutError)):
                    await t
            # B sees A's counts while A's ownership lives (it renewed at most TTL/3 before
            # the kill, so it lives >= 6.6 s after it; B asks at once)...
            first = await fetch(http, "GET", b.url + "/authen/utilities/status")
            assert first.status == 503, first

            # ...and, once it lapses, the slots are free, though the sleepies still run upstream.
            async def free() -> bool:
                return (await fetch(http, "GET", b.url + "/authen/utilities/status")).status == 200

            await wait_until(free, timeout=25, message="A's counts expiring")
            assert time.monotonic() - killed_at < 30  # before the 30 s sleepies end
            assert not await redis.exists(PREFIX + "alive:" + a_id)
            for address in authen_addresses(stack):
                key = PREFIX + "tasks:" + address
                # A's share no longer counts; where no admission has swept it yet, it expires.
                if a_id.encode() in await redis.hkeys(key):
                    assert 0 < await redis.pttl(key) <= 100_000
        finally:
            await a.stop()
            await b.stop()
    finally:
        await redis.aclose()


async def test_a_dependency_outage_opens_no_breaker(stack, http) -> None:
    """With the PostgreSQL primary stopped, authen refuses writes with a 503 marked as a
    dependency outage: the instances are healthy, so their breakers stay closed and the
    reads that the replicas serve still go through the gateway."""
    async with await start_gateway(stack, breaker_failures=2, breaker_min_requests=2) as g:
        await wait_routed(http, g.url, "authen", 2)
        await asyncio.to_thread(stack.control.stop, "postgres-primary")
        try:
            body = {"username": "", "password": "long enough", "first_name": "A", "last_name": "B", "type": "customer"}
            for i in range(6):
                body["username"] = f"dep_{os.getpid()}_{i}_{time.monotonic_ns()}"
                r = await fetch(http, "POST", g.url + "/authen/authen/signup", body=body)
                assert r.status == 503 and "primary" in r.json["detail"], r
                assert r.headers.get("X-Dependency-Unavailable") == "postgresql-primary"
            instances = await gateway_instances(http, g.url)
            assert {i["breaker"]["state"] for i in instances.values()} == {"closed"}, instances
            for _ in range(4):
                assert (await fetch(http, "GET", g.url + "/authen/list/employee")).status == 200
        finally:
            await asyncio.to_thread(stack.control.start, "postgres-primary")

        async def writable() -> bool:
            body["username"] = f"dep_{os.getpid()}_back_{time.monotonic_ns()}"
            return (await fetch(http, "POST", g.url + "/authen/authen/signup", body=body)).status == 201

        await wait_until(writable, timeout=30, interval=0.2, message="writes accepted again")
