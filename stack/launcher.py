"""``stack up``: the whole local stack in the foreground, stopped cleanly by Ctrl-C or SIGTERM."""

from __future__ import annotations

import asyncio
import errno
import fcntl
import logging
import os
import signal
import socket
import sys
import time
from collections.abc import Awaitable
from pathlib import Path

from tornado.httpclient import AsyncHTTPClient

from common import internal, tokens
from common.tasks import cancel_and_wait
from stack import datatier
from stack.control import serve_control, socket_path
from stack.layout import SETUP_ONLY_ENV, Layout, service_env, signing_env
from stack.services import SERVICES, ServiceSpec
from stack.supervisor import ProcSpec, StartFailed, Supervisor, kill_leftovers
from stack.topology import CLUSTER_NODES

log = logging.getLogger("stack")


class StackError(Exception):
    """Something the person running the stack must fix (a port taken, a stack running)."""


def port_in_use(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
        except OSError as e:
            return e.errno == errno.EADDRINUSE
    return False


def service_specs(layout: Layout, spec: ServiceSpec, base_env: dict[str, str]) -> list[ProcSpec]:
    ports = layout.ports(spec.port_key)
    procs = []
    for name, port in zip(spec.instance_names(len(ports)), ports):
        env = {
            **base_env,
            **(signing_env(layout) if spec.signs_tokens else {}),
            **spec.env,
            "PORT": str(port),
            "ADVERTISE_HOST": "127.0.0.1",
        }

        def health(port: int = port, path: str = spec.health_path) -> Awaitable[bool]:
            async def check() -> bool:
                resp = await AsyncHTTPClient().fetch(
                    f"http://127.0.0.1:{port}{path}", request_timeout=2, raise_error=False
                )
                return resp.code == 200

            return check()

        procs.append(
            ProcSpec(
                name=name,
                argv=[sys.executable, "-m", spec.module],
                health=health,
                env=env,
                ports=(port,),
                stop_timeout_s=20,
            )
        )
    return procs


class Stack:
    def __init__(self, layout: Layout) -> None:
        self.layout = layout
        self.state_dir = layout.state_dir
        self.sup = Supervisor(layout.logs_dir, layout.state_dir / "pids")
        self.data_groups: list[list[str]] = []
        self.service_groups: list[list[str]] = []
        self.stopping = asyncio.Event()
        self.ready = False
        self._lock_fd: int | None = None

    # -- guard rails ---------------------------------------------------------------
    def acquire_lock(self) -> None:
        self.state_dir.mkdir(parents=True, exist_ok=True)
        if os.geteuid() == 0:
            # PostgreSQL runs as another user and must reach its folders inside.
            self.state_dir.chmod(0o755)
        for sub in ("logs", "pids", "keys"):
            (self.state_dir / sub).mkdir(exist_ok=True)
        fd = os.open(self.state_dir / "stack.lock", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError as e:
            pid = (self.state_dir / "stack.pid").read_text().strip() if (self.state_dir / "stack.pid").exists() else "?"
            os.close(fd)
            raise StackError(
                f"a Barber stack is already running from {self.state_dir} (pid {pid}); `make down` stops it"
            ) from e
        self._lock_fd = fd
        (self.state_dir / "stack.pid").write_text(str(os.getpid()))
        self._kill_leftovers()

    def _kill_leftovers(self) -> None:
        """Processes a previous, SIGKILLed supervisor may have left (normally none)."""
        for killed in kill_leftovers(self.state_dir / "pids"):
            log.warning("killed leftover %s", killed)

    def check_ports(self, specs: list[ProcSpec]) -> None:
        for spec in specs:
            for port in spec.ports:
                if port_in_use(port):
                    raise StackError(
                        f"port {port}, needed by {spec.name}, is already in use by another program; "
                        f"stop it, or move the whole stack with PORT_OFFSET"
                    )

    # -- bring-up ------------------------------------------------------------------
    async def _start_group(self, specs: list[ProcSpec]) -> None:
        await asyncio.gather(*(self.sup.start(s) for s in specs))

    async def _postgres(self, bindir: Path, user: str | None) -> None:
        fresh = await datatier.pg_init_primary(self.layout, bindir, user)
        await self.sup.start(datatier.pg_spec(self.layout, 0, bindir, user))
        await datatier.pg_create_databases(self.layout)
        for i in range(1, datatier.REPLICA_COUNT + 1):
            await datatier.pg_init_replica(self.layout, i, bindir, user, fresh=fresh)
        await self._start_group(
            [datatier.pg_spec(self.layout, i, bindir, user) for i in range(1, datatier.REPLICA_COUNT + 1)]
        )

    async def _redis_cluster(self, bindir: Path) -> None:
        await self._start_group([datatier.cluster_node_spec(self.layout, i, bindir) for i in range(CLUSTER_NODES)])
        await datatier.cluster_ensure(self.layout, bindir)

    async def start_data_tier(self) -> None:
        pg_bin, redis_bin, pg_user = datatier.postgres_bindir(), datatier.redis_bindir(), datatier.pg_run_user()
        all_specs = (
            [datatier.pg_spec(self.layout, i, pg_bin, pg_user) for i in range(datatier.REPLICA_COUNT + 1)]
            + [datatier.redis_spec(self.layout, redis_bin), datatier.mongo_spec(self.layout)]
            + [datatier.cluster_node_spec(self.layout, i, redis_bin) for i in range(CLUSTER_NODES)]
        )
        self.check_ports(all_specs)
        self.data_groups = [
            ["mongo", "redis"] + [f"redis-cluster-{i + 1}" for i in range(CLUSTER_NODES)],
            [datatier.pg_name(i) for i in range(1, datatier.REPLICA_COUNT + 1)],
            [datatier.pg_name(0)],
        ]
        await asyncio.gather(
            self._postgres(pg_bin, pg_user),
            self.sup.start(datatier.redis_spec(self.layout, redis_bin)),
            self._redis_cluster(redis_bin),
            self.sup.start(datatier.mongo_spec(self.layout)),
        )

    async def start_services(self) -> None:
        tokens.generate_keypair(self.layout.jwt_private_key, self.layout.jwt_public_key)
        internal.generate_secret(self.layout.service_secret)
        # Secrets only a setup step needs (the admin's password) stay out of every
        # service's environment, where /proc and crash reports could show them.
        setup_only = {k: v for k, v in os.environ.items() if k in SETUP_ONLY_ENV}
        base_env = {**{k: v for k, v in os.environ.items() if k not in SETUP_ONLY_ENV}, **service_env(self.layout)}
        groups = [(spec, service_specs(self.layout, spec, base_env)) for spec in SERVICES]
        self.check_ports([p for _, procs in groups for p in procs])
        for spec, procs in groups:
            for step in spec.setup:
                await datatier._run(
                    [sys.executable, "-m", spec.module, *step], env={**base_env, **spec.env, **setup_only}
                )
            # Known before it starts: a failure or Ctrl-C part-way through must still stop
            # the instances already up, before the data tier.
            self.service_groups.insert(0, [p.name for p in procs])
            await self._start_group(procs)

    async def stop_all(self) -> None:
        self.sup.shutting_down = True
        for group in self.service_groups + self.data_groups:
            await asyncio.gather(*(self.sup.stop(n, hold=False) for n in group if n in self.sup.procs))

    # -- control -------------------------------------------------------------------
    async def handle(self, request: dict) -> object:
        cmd = request.get("cmd")
        name = request.get("name")
        if cmd == "status":
            return {
                "ready": self.ready,
                "pid": os.getpid(),
                "processes": self.sup.status(),
                "port_offset": self.layout.port_offset,
            }
        if cmd in ("stop", "start", "restart"):
            if name not in self.sup.procs:
                raise KeyError(f"no process named {name!r}")
            if cmd == "stop":
                await self.sup.stop(name)
            elif cmd == "start":
                await self.sup.start(name)
            else:
                await self.sup.restart(name)
            return self.sup.status()[name]
        if cmd == "shutdown":
            self.stopping.set()
            return "stopping"
        raise ValueError(f"unknown command {cmd!r}")

    def print_urls(self) -> None:
        lay = self.layout
        lines = [
            f"Barber is up; the public entry is the gateway, {lay.gateway_url}",
            f"  PostgreSQL         {lay.pg_dsn('authen')} (primary); replicas on "
            f"{', '.join(str(p) for p in lay.ports('postgres')[1:])}",
            f"  Redis              {lay.redis_url}",
            f"  Redis Cluster      {lay.redis_cluster_nodes}",
            f"  MongoDB (wire)     {lay.mongo_url}",
        ]
        for spec in SERVICES:
            lines.append(f"  {spec.name:<18} " + ", ".join(f"http://127.0.0.1:{p}" for p in lay.ports(spec.port_key)))
        lines.append(f"  logs               {lay.logs_dir}/")
        lines.append("Ctrl-C stops everything.")
        print("\n".join(lines), flush=True)

    async def run(self) -> int:
        self.acquire_lock()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, self.stopping.set)
        control = await serve_control(self.state_dir, self.handle)
        t0 = time.monotonic()
        code = 0
        try:
            bring_up = asyncio.create_task(self._bring_up())
            stop_wait = asyncio.create_task(self.stopping.wait())
            done, _ = await asyncio.wait({bring_up, stop_wait}, return_when=asyncio.FIRST_COMPLETED)
            if bring_up in done:
                bring_up.result()
                self.ready = True
                log.info("all healthy in %.1fs", time.monotonic() - t0)
                self.print_urls()
                await stop_wait
            else:
                await cancel_and_wait(bring_up)
        except (StartFailed, StackError, datatier.SetupError) as e:
            log.error("%s", e)
            code = 1
        finally:
            log.info("stopping the stack")
            await self.stop_all()
            control.close()
            socket_path(self.state_dir).unlink(missing_ok=True)
            (self.state_dir / "stack.pid").unlink(missing_ok=True)
            log.info("stopped")
        return code

    async def _bring_up(self) -> None:
        await self.start_data_tier()
        await self.start_services()
