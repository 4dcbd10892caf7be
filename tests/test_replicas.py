"""Read/write routing seen through authen, with faults: replay paused, a replica lagging or
stopped, the primary stopped. Every test restores what it broke."""

from __future__ import annotations

import asyncio

import psycopg

from tests.http import call
from tests.procs import start_service
from tests.stackproc import StackProcess
from tests.test_authen_support import on_replica, replay_paused, signup, status
from tests.util import wait_until


async def reads(base: str) -> dict[str, int]:
    return (await status(base))["database"]["reads"]


async def reads_move_to(base: str, node: str, user_id: int, timeout: float = 30.0) -> None:
    """Keep reading until ``node`` serves one (the monitor has seen it fresh again)."""

    async def served() -> bool:
        before = (await reads(base))[node]
        reply = await call("GET", f"{base}/utilities/check?user_id={user_id}")
        assert reply.code == 200, reply
        return (await reads(base))[node] > before

    await wait_until(served, timeout=timeout, interval=0.1, message=f"{base} reading from {node} again")


async def new_user(base: str) -> tuple[dict, int]:
    body, reply = await signup(base)
    assert reply.code == 201, reply
    return body, reply.json["user_id"]


async def stop(stack: StackProcess, name: str) -> None:
    await asyncio.to_thread(stack.control.stop, name)


async def start(stack: StackProcess, name: str) -> None:
    await asyncio.to_thread(stack.control.start, name)


async def test_reads_are_balanced_over_both_replicas(a1: str) -> None:
    _, user_id = await new_user(a1)
    # Once both replicas replayed the sign-up (each has served a read of it; with no
    # write since, the monitor's view of them only moves forward), round robin spreads
    # reads over both.
    await reads_move_to(a1, "replica-1", user_id)
    await reads_move_to(a1, "replica-2", user_id)
    before = await reads(a1)
    for _ in range(10):
        assert (await call("GET", f"{a1}/utilities/check?user_id={user_id}")).code == 200
    after = await reads(a1)
    assert after["replica-1"] - before["replica-1"] >= 3
    assert after["replica-2"] - before["replica-2"] >= 3


async def test_read_your_writes_across_instances_while_replay_is_paused(stack: StackProcess, a1: str, a2: str) -> None:
    async with replay_paused(stack):
        await wait_until(lambda: _all_paused(a2), timeout=10, message="a2 sees replay paused")
        body, reply = await signup(a1, type_="employee")
        assert reply.code == 201, reply
        user_id = reply.json["user_id"]
        # The replicas really lack the new user...
        for index in (1, 2):
            assert await on_replica(stack, index, "SELECT id FROM users WHERE id = %s", (user_id,)) is None
        before = await reads(a2)
        # ...yet the other instance, reading right away, sees it (from the primary).
        signin = await call("POST", a2 + "/authen/signin", {"username": body["username"], "password": body["password"]})
        assert signin.code == 200, signin
        assert signin.json["user_id"] == user_id
        check = await call("GET", f"{a2}/utilities/check?user_id={user_id}")
        assert check.code == 200 and check.json["username"] == body["username"]
        listed = await call("GET", a2 + "/list/employee?limit=1000")
        assert user_id in [u["id"] for u in listed.json]
        after = await reads(a2)
        assert after["primary"] - before["primary"] >= 3
        assert after["replica-1"] == before["replica-1"] and after["replica-2"] == before["replica-2"]
    # Replay resumed: the replicas catch up and serve reads again.
    await reads_move_to(a2, "replica-1", user_id)
    await reads_move_to(a2, "replica-2", user_id)


async def _all_paused(base: str) -> bool:
    return all(r["replay_paused"] for r in (await status(base))["database"]["replicas"])


async def test_lagging_replica_is_avoided_then_used_again(stack: StackProcess) -> None:
    # An extra instance with a 1 s lag limit, so the test does not wait for the default.
    async with await start_service(
        stack, "authen", extra_env={"AUTHEN_REPLICA_MAX_LAG_S": "1"}, name="authen-lag"
    ) as svc:
        _, user_id = await new_user(svc.url)
        await reads_move_to(svc.url, "replica-1", user_id)
        async with replay_paused(stack, (1,)):
            # WAL that authen did not write (so the high-water mark does not move) makes
            # replica-1 fall behind: only the lag limit can keep reads away from it.
            async with await psycopg.AsyncConnection.connect(
                stack.layout.pg_dsn("authen", 0), autocommit=True, connect_timeout=5
            ) as primary:
                await primary.execute("CREATE TABLE IF NOT EXISTS replicas_lag_probe (n int)")
                await primary.execute("INSERT INTO replicas_lag_probe VALUES (1)")

            async def lagging() -> bool:
                r1 = (await status(svc.url))["database"]["replicas"][0]
                return r1["lagging"] and r1["lag_s"] > 1

            await wait_until(lagging, timeout=15, message="replica-1 reported lagging")
            before = await reads(svc.url)
            for _ in range(6):
                assert (await call("GET", f"{svc.url}/utilities/check?user_id={user_id}")).code == 200
            after = await reads(svc.url)
            assert after["replica-1"] == before["replica-1"]
            assert after["replica-2"] + after["primary"] - before["replica-2"] - before["primary"] == 6
        await reads_move_to(svc.url, "replica-1", user_id)


async def test_replica_stopped_reads_continue_and_it_is_used_again(stack: StackProcess, a1: str) -> None:
    body, user_id = await new_user(a1)
    await reads_move_to(a1, "replica-1", user_id)
    await stop(stack, "postgres-replica-1")
    try:
        for _ in range(8):
            check = await call("GET", f"{a1}/utilities/check?user_id={user_id}")
            assert check.code == 200, check
        signin = await call("POST", a1 + "/authen/signin", {"username": body["username"], "password": body["password"]})
        assert signin.code == 200, signin

        async def down() -> bool:
            return not (await status(a1))["database"]["replicas"][0]["healthy"]

        await wait_until(down, timeout=10, message="replica-1 reported down")
        before = await reads(a1)
        for _ in range(4):
            assert (await call("GET", f"{a1}/utilities/check?user_id={user_id}")).code == 200
        assert (await reads(a1))["replica-1"] == before["replica-1"]
    finally:
        await start(stack, "postgres-replica-1")
    await reads_move_to(a1, "replica-1", user_id, timeout=60)


async def test_primary_stopped_reads_served_writes_refused_then_resumed(stack: StackProcess, a1: str, a2: str) -> None:
    body, user_id = await new_user(a1)
    await reads_move_to(a2, "replica-1", user_id)
    await stop(stack, "postgres-primary")
    try:
        for base in (a1, a2):
            check = await call("GET", f"{base}/utilities/check?user_id={user_id}")
            assert check.code == 200, check
            listed = await call("GET", base + "/list/employee")
            assert listed.code == 200, listed
            signin = await call(
                "POST", base + "/authen/signin", {"username": body["username"], "password": body["password"]}
            )
            assert signin.code == 200, signin
        _, refused = await signup(a1)
        assert refused.code == 503, refused
        assert "primary" in refused.json["detail"]

        async def degraded() -> bool:
            state = await status(a2)
            return state["status"] == "degraded" and state["database"]["primary"]["healthy"] is False

        await wait_until(degraded, timeout=10, message="primary reported down")
    finally:
        await start(stack, "postgres-primary")

    async def writable() -> bool:
        return (await signup(a2))[1].code == 201

    await wait_until(writable, timeout=30, interval=0.2, message="writes accepted again")
    again, new_id = await new_user(a1)
    signin = await call("POST", a2 + "/authen/signin", {"username": again["username"], "password": again["password"]})
    assert signin.code == 200 and signin.json["user_id"] == new_id

    async def ok() -> bool:
        return (await status(a1))["status"] == "ok"

    await wait_until(ok, timeout=10, message="primary reported healthy again")
