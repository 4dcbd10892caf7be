"""The local data tier: replication, prepared transactions, Redis Cluster failover, MongoDB, stop."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import uuid

import psycopg
import pytest
import redis
import redis.asyncio as aioredis
from pymongo import ASCENDING, DESCENDING, AsyncMongoClient, ReturnDocument
from pymongo.errors import DuplicateKeyError
from redis.asyncio.cluster import ClusterNode, RedisCluster

from tests.stackproc import ROOT, StackProcess
from tests.util import port_free, wait_until, wait_until_sync


def pg(stack: StackProcess, index: int = 0, db: str = "postgres") -> psycopg.Connection:
    return psycopg.connect(stack.layout.pg_dsn(db, index), autocommit=True, connect_timeout=3)


@pytest.fixture(scope="module")
def probe_table(stack: StackProcess) -> str:
    with pg(stack) as conn:
        conn.execute("CREATE TABLE IF NOT EXISTS stack_probe (id text PRIMARY KEY, note text)")
    return "stack_probe"


def test_only_authen_is_told_where_the_signing_key_is(stack: StackProcess) -> None:
    """authen alone signs tokens; the other services get only the public key's path."""
    seen = {}
    for name, proc in stack.control.status()["processes"].items():
        if proc["pid"] is None or not name.startswith(("authen", "chat", "gateway", "discovery", "etl")):
            continue
        with open(f"/proc/{proc['pid']}/environ", "rb") as f:
            names = {item.split(b"=", 1)[0] for item in f.read().split(b"\0") if item}
        seen[name] = (b"JWT_PRIVATE_KEY_FILE" in names, b"JWT_PUBLIC_KEY_FILE" in names)
    assert {n.split("-")[0] for n in seen} == {"authen", "chat", "gateway", "discovery", "etl"}, seen
    for name, (private, public) in seen.items():
        assert public and private == name.startswith("authen"), (name, seen)


@pytest.mark.unit
def test_a_leftover_pid_file_kills_only_the_process_it_was_written_for(tmp_path) -> None:
    from stack.supervisor import kill_pidfile, write_pidfile

    proc = subprocess.Popen(["sleep", "60"], start_new_session=True)
    try:
        # The same pid with another start time: the pid was reused by an unrelated program.
        reused = tmp_path / "reused.pid"
        reused.write_text(f"{proc.pid} 1")
        assert kill_pidfile(reused) is None and not reused.exists()
        assert proc.poll() is None
        real = tmp_path / "real.pid"
        write_pidfile(real, proc.pid)
        assert kill_pidfile(real) == f"real (pid {proc.pid})"
        assert proc.wait(timeout=10) == -signal.SIGKILL
    finally:
        proc.kill()
        proc.wait()


# -- PostgreSQL -------------------------------------------------------------------------
def test_primary_write_reaches_both_replicas(stack: StackProcess, probe_table: str) -> None:
    key = uuid.uuid4().hex
    with pg(stack) as conn:
        conn.execute("INSERT INTO stack_probe VALUES (%s, 'replicated')", (key,))
    for index in (1, 2):
        with pg(stack, index) as replica:
            wait_until_sync(
                lambda: replica.execute("SELECT note FROM stack_probe WHERE id = %s", (key,)).fetchone(),
                timeout=15,
                message=f"row on replica {index}",
            )
            assert replica.execute("SELECT note FROM stack_probe WHERE id = %s", (key,)).fetchone() == ("replicated",)


@pytest.mark.parametrize("index", [1, 2])
def test_replica_refuses_writes(stack: StackProcess, probe_table: str, index: int) -> None:
    wait_until_sync(lambda: pg(stack, index).execute("SELECT 1 FROM stack_probe LIMIT 1") is not None, timeout=15)
    with pg(stack, index) as replica, pytest.raises(psycopg.errors.ReadOnlySqlTransaction):
        replica.execute("INSERT INTO stack_probe VALUES (%s, 'nope')", (uuid.uuid4().hex,))


def test_service_databases_exist(stack: StackProcess) -> None:
    with pg(stack) as conn:
        names = {r[0] for r in conn.execute("SELECT datname FROM pg_database").fetchall()}
        assert {"authen", "coordinator", "warehouse"} <= names
        assert int(conn.execute("SHOW max_prepared_transactions").fetchone()[0]) >= 64


@pytest.mark.parametrize("outcome", ["commit", "rollback"])
def test_prepared_transactions(stack: StackProcess, probe_table: str, outcome: str) -> None:
    key = uuid.uuid4().hex
    gid = f"test-{key}"
    with pg(stack) as conn:
        conn.autocommit = False
        conn.execute("INSERT INTO stack_probe VALUES (%s, 'prepared')", (key,))
        conn.execute(f"PREPARE TRANSACTION '{gid}'")
        conn.autocommit = True
    with pg(stack) as other:
        assert other.execute("SELECT gid FROM pg_prepared_xacts WHERE gid = %s", (gid,)).fetchone() == (gid,)
        # Not visible until the decision.
        assert other.execute("SELECT 1 FROM stack_probe WHERE id = %s", (key,)).fetchone() is None
        other.execute(f"{'COMMIT' if outcome == 'commit' else 'ROLLBACK'} PREPARED '{gid}'")
        assert other.execute("SELECT 1 FROM pg_prepared_xacts WHERE gid = %s", (gid,)).fetchone() is None
        present = other.execute("SELECT 1 FROM stack_probe WHERE id = %s", (key,)).fetchone() is not None
        assert present is (outcome == "commit")


# -- Redis ------------------------------------------------------------------------------
async def test_standalone_redis(stack: StackProcess) -> None:
    client = aioredis.from_url(stack.env["REDIS_URL"])
    try:
        key = f"probe:{uuid.uuid4().hex}"
        await client.set(key, "v", ex=30)
        assert await client.get(key) == b"v"
    finally:
        await client.aclose()


def cluster_client(stack: StackProcess) -> RedisCluster:
    nodes = [ClusterNode(*n.split(":")) for n in stack.env["REDIS_CLUSTER_NODES"].split(",")]
    return RedisCluster(startup_nodes=nodes, decode_responses=True)


def masters(stack: StackProcess) -> dict[str, list[tuple[int, int]]]:
    """master address -> slot ranges, as one node sees it."""
    result: dict[str, list[tuple[int, int]]] = {}
    for port in stack.layout.ports("redis_cluster"):
        try:
            with redis.Redis(port=port, socket_timeout=2) as node:
                for shard in node.execute_command("CLUSTER SLOTS"):
                    addr = f"{shard[2][0].decode()}:{shard[2][1]}"
                    result.setdefault(addr, []).append((shard[0], shard[1]))
            return result
        except redis.ConnectionError:
            continue
    raise AssertionError("no cluster node answers")


async def test_cluster_has_three_masters_covering_all_slots(stack: StackProcess) -> None:
    owners = masters(stack)
    assert len(owners) == 3
    covered = sorted(r for ranges in owners.values() for r in ranges)
    assert sum(end - start + 1 for start, end in covered) == 16384
    client = cluster_client(stack)
    try:
        keys = [f"spread:{i}" for i in range(300)]
        for k in keys:
            await client.set(k, k, ex=300)
        by_node = {}
        for k in keys:
            node = client.get_node_from_key(k)
            by_node[node.name] = by_node.get(node.name, 0) + 1
        assert len(by_node) == 3, by_node
        assert all(count > 30 for count in by_node.values()), by_node
    finally:
        await client.aclose()


async def test_cluster_master_killed_replica_takes_over(stack: StackProcess) -> None:
    client = cluster_client(stack)
    try:
        keys = [f"failover:{uuid.uuid4().hex}:{i}" for i in range(200)]
        for k in keys:
            await client.set(k, k)
        victim = client.get_node_from_key(keys[0])
        victim_keys = [k for k in keys if client.get_node_from_key(k).name == victim.name]
        # Make sure the replica has every write before the master dies.
        with redis.Redis(host=victim.host, port=victim.port) as direct:
            assert direct.execute_command("WAIT", 1, 5000) >= 1
        port = int(victim.port)
        name = f"redis-cluster-{stack.layout.ports('redis_cluster').index(port) + 1}"
        pid = stack.control.pid(name)
        assert pid
        os.kill(pid, signal.SIGKILL)

        def promoted() -> bool:
            return victim.name not in masters(stack) and len(masters(stack)) == 3

        await wait_until(promoted, timeout=30, interval=0.2, message="replica promoted")

        async def all_readable() -> bool:
            return all([await client.get(k) == k for k in victim_keys])

        await wait_until(all_readable, timeout=30, interval=0.2, message="every key of the shard readable")
    finally:
        await client.aclose()

    # The supervisor restarts the killed node; it rejoins as a replica and the cluster is whole.
    def rejoined() -> bool:
        status = stack.control.status()["processes"][name]
        if status["state"] != "running":
            return False
        with redis.Redis(port=port, socket_timeout=2, decode_responses=True) as node:
            info = node.execute_command("CLUSTER INFO")
            info = info if isinstance(info, dict) else dict(ln.split(":", 1) for ln in info.splitlines() if ":" in ln)
            return info.get("cluster_state") == "ok" and node.execute_command("ROLE")[0] == "slave"

    await wait_until(rejoined, timeout=60, interval=0.3, message=f"{name} back as a replica")


# -- MongoDB wire server ----------------------------------------------------------------
async def test_mongo_wire_server(stack: StackProcess) -> None:
    client: AsyncMongoClient = AsyncMongoClient(stack.env["MONGO_URL"], serverSelectionTimeoutMS=5000)
    try:
        db = client[f"probe_{uuid.uuid4().hex[:8]}"]
        await db.items.create_index([("group", ASCENDING), ("n", ASCENDING)], unique=True)
        await db.items.insert_many([{"group": "g", "n": n} for n in range(10)])
        newest = [d["n"] async for d in db.items.find({"group": "g"}).sort("n", DESCENDING).limit(3)]
        assert newest == [9, 8, 7]
        with pytest.raises(DuplicateKeyError):
            await db.items.insert_one({"group": "g", "n": 5})

        async def bump() -> int:
            doc = await db.counters.find_one_and_update(
                {"_id": "c"}, {"$inc": {"v": 1}}, upsert=True, return_document=ReturnDocument.AFTER
            )
            return doc["v"]

        import asyncio

        values = await asyncio.gather(*(bump() for _ in range(50)))
        assert sorted(values) == list(range(1, 51))
        await client.drop_database(db.name)
    finally:
        await client.close()


# -- the launcher's guard rails and a clean stop -------------------------------------------
def run_cli(stack: StackProcess, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "stack", *args],
        cwd=ROOT,
        env=stack.command_env(),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def test_second_up_is_refused(stack: StackProcess) -> None:
    result = run_cli(stack, "up", timeout=30)
    assert result.returncode != 0
    assert "already running" in result.stdout + result.stderr


def test_port_taken_is_reported(stack: StackProcess) -> None:
    other = StackProcess(stack.layout.port_offset + 700)
    import socket

    port = other.layout.port("postgres")
    with socket.socket() as blocker:
        blocker.bind(("127.0.0.1", port))
        blocker.listen()
        result = run_cli(other, "up", timeout=60)
    other.remove()
    assert result.returncode != 0
    out = result.stdout + result.stderr
    assert f"port {port}" in out and "postgres-primary" in out


def test_status_reports_replication_cluster_and_mongo(stack: StackProcess) -> None:
    import json

    result = run_cli(stack, "status", "--json", timeout=30)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["ready"] is True
    assert len(report["postgres"]["primary"]["replication"]) == 2
    assert report["redis_cluster"]["state"] == "ok" and len(report["redis_cluster"]["masters"]) == 3
    assert report["mongo"]["healthy"] is True


def test_down_leaves_nothing_and_data_survives_restart(stack: StackProcess) -> None:
    """A second, full stack: data survives `up` again; `down` leaves no process or port."""
    other = StackProcess(stack.layout.port_offset + 350)
    try:
        other.start()
        with psycopg.connect(other.layout.pg_dsn("postgres"), autocommit=True) as conn:
            conn.execute("CREATE TABLE survivor (v text)")
            conn.execute("INSERT INTO survivor VALUES ('still here')")
        assert other.stop() == 0
        other.start()
        with psycopg.connect(other.layout.pg_dsn("postgres"), autocommit=True) as conn:
            assert conn.execute("SELECT v FROM survivor").fetchone() == ("still here",)
        processes = other.control.status()["processes"]
        pids = [p["pid"] for p in processes.values() if p["pid"]]
        ports = [port for p in processes.values() for port in p["ports"]]
        assert len(pids) == len(processes)

        result = run_cli(other, "down")
        assert result.returncode == 0, result.stderr

        def gone(pid: int) -> bool:
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                return True
            # A zombie (not yet reaped by our Popen) holds nothing.
            with open(f"/proc/{pid}/stat") as f:
                return f.read().split(") ")[1].startswith("Z")

        wait_until_sync(lambda: all(gone(p) for p in pids), timeout=30, message="no stack process left")
        other.process.wait(30)
        taken = [p for p in ports if not port_free(p)]
        assert not taken, f"ports still held: {taken}"
    finally:
        other.stop()
        other.remove()
