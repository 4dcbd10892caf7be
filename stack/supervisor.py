"""A small process supervisor: start, health-check, restart with backoff, stop in order.

Like a container restart policy: a process that dies without being asked to is started
again after a growing delay (reset once it has stayed up a while), and each restart is
logged. A process stopped through :meth:`Supervisor.stop` is *held* down until
:meth:`Supervisor.start` (tests use this to take a replica or Redis away on purpose).

Children run in their own session, so Ctrl-C reaches only the supervisor, which then
stops them in order; and each gets a parent-death signal, so a supervisor killed with
SIGKILL leaves no orphan behind.
"""

from __future__ import annotations

import asyncio
import ctypes
import logging
import os
import pwd
import signal
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

from common.tasks import backoff_delay

log = logging.getLogger("stack")

PR_SET_PDEATHSIG = 1
_libc = ctypes.CDLL(None, use_errno=True)


def _start_ticks(pid: int) -> str | None:
    """The process's start time (clock ticks since boot), which tells a reused pid apart."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # The command name (field 2) may hold spaces; the fields after its ")" are plain.
    return stat.rpartition(")")[2].split()[19]


def write_pidfile(path: Path, pid: int) -> None:
    path.write_text(f"{pid} {_start_ticks(pid) or ''}".strip())


def kill_pidfile(path: Path) -> str | None:
    """SIGKILL the process group a pid file names, if that process still is the one the
    file was written for (a pid reused by another program is left alone); removes the
    file. Returns what was killed, for the log."""
    try:
        pid_text, _, ticks = path.read_text().strip().partition(" ")
        pid = int(pid_text)
    except (OSError, ValueError):
        path.unlink(missing_ok=True)
        return None
    killed = None
    if ticks and _start_ticks(pid) == ticks:
        try:
            os.killpg(pid, signal.SIGKILL)
            killed = f"{path.stem} (pid {pid})"
        except (ProcessLookupError, PermissionError):
            pass
    path.unlink(missing_ok=True)
    return killed


def kill_leftovers(pids_dir: Path) -> list[str]:
    """What a SIGKILLed supervisor left running (normally nothing): killed, and named."""
    return [k for k in (kill_pidfile(p) for p in sorted(pids_dir.glob("*.pid"))) if k]


HealthCheck = Callable[[], Awaitable[bool]]


def _die_with_parent(sig: int) -> Callable[[], None]:
    def preexec() -> None:
        # Runs after the uid change, which would otherwise clear the setting.
        _libc.prctl(PR_SET_PDEATHSIG, sig, 0, 0, 0)

    return preexec


@dataclass
class ProcSpec:
    name: str
    argv: list[str]
    health: HealthCheck
    env: dict[str, str] | None = None
    cwd: Path | None = None
    user: str | None = None  # run as this user (PostgreSQL refuses root)
    ports: tuple[int, ...] = ()
    stop_signal: int = signal.SIGTERM
    stop_timeout_s: float = 20.0
    start_timeout_s: float = 60.0
    # Runs before every start (also restarts), e.g. to clear a stale pid file.
    before_start: Callable[[], None] | None = None
    # The shortest wait before a restart after a crash.
    min_restart_delay_s: float = 0.25


@dataclass
class Proc:
    spec: ProcSpec
    process: asyncio.subprocess.Process | None = None
    state: str = "stopped"  # starting | running | backoff | stopping | stopped | held | failed
    restarts: int = 0
    started_at: float = 0.0
    last_exit: int | None = None
    watcher: asyncio.Task[None] | None = None
    healthy: asyncio.Event = field(default_factory=asyncio.Event)

    def describe(self) -> dict:
        return {
            "pid": self.process.pid if self.process and self.process.returncode is None else None,
            "state": self.state,
            "restarts": self.restarts,
            "last_exit": self.last_exit,
            "ports": list(self.spec.ports),
            "uptime_s": round(time.monotonic() - self.started_at, 1) if self.state == "running" else None,
        }


class StartFailed(Exception):
    pass


class Supervisor:
    def __init__(self, logs_dir: Path, pids_dir: Path) -> None:
        self.logs_dir = logs_dir
        self.pids_dir = pids_dir
        self.procs: dict[str, Proc] = {}
        self.shutting_down = False

    # -- spawning --------------------------------------------------------------------
    async def _spawn(self, proc: Proc) -> None:
        spec = proc.spec
        if spec.before_start:
            spec.before_start()
        self.logs_dir.mkdir(parents=True, exist_ok=True)
        logfile = open(self.logs_dir / f"{spec.name}.log", "ab")
        kwargs: dict = {}
        if spec.user:
            pw = pwd.getpwnam(spec.user)
            kwargs.update(user=pw.pw_uid, group=pw.pw_gid, extra_groups=[])
        die_sig = signal.SIGINT if spec.stop_signal == signal.SIGINT else signal.SIGTERM
        try:
            proc.process = await asyncio.create_subprocess_exec(
                *spec.argv,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=logfile,
                stderr=asyncio.subprocess.STDOUT,
                env=spec.env,
                cwd=spec.cwd,
                start_new_session=True,
                preexec_fn=_die_with_parent(die_sig),
                **kwargs,
            )
        finally:
            logfile.close()
        proc.started_at = time.monotonic()
        proc.healthy.clear()
        proc.state = "starting"
        write_pidfile(self.pids_dir / f"{spec.name}.pid", proc.process.pid)

    async def _wait_healthy(self, proc: Proc) -> bool:
        deadline = time.monotonic() + proc.spec.start_timeout_s
        while time.monotonic() < deadline:
            if proc.process is None or proc.process.returncode is not None:
                return False
            try:
                if await proc.spec.health():
                    proc.state = "running"
                    proc.healthy.set()
                    return True
            except Exception:  # a health probe that cannot connect yet means "not yet"
                pass
            await asyncio.sleep(0.1)
        return False

    def _tail(self, name: str, lines: int = 15) -> str:
        path = self.logs_dir / f"{name}.log"
        try:
            return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    async def start(self, spec: ProcSpec | str) -> Proc:
        """Start (or start again) a process and wait until it is healthy."""
        if isinstance(spec, str):
            proc = self.procs[spec]
        else:
            proc = self.procs.get(spec.name) or Proc(spec)
            proc.spec = spec
            self.procs[spec.name] = proc
        if proc.process is not None and proc.process.returncode is None:
            await proc.healthy.wait()
            return proc
        await self._spawn(proc)
        t0 = time.monotonic()
        if not await self._wait_healthy(proc):
            rc = proc.process.returncode if proc.process else None
            await self._terminate(proc)
            proc.state = "failed"
            raise StartFailed(
                f"{proc.spec.name} did not become healthy (exit code {rc}); "
                f"last lines of {self.logs_dir / (proc.spec.name + '.log')}:\n{self._tail(proc.spec.name)}"
            )
        assert proc.process is not None
        log.info("%s healthy in %.1fs (pid %d)", proc.spec.name, time.monotonic() - t0, proc.process.pid)
        proc.watcher = asyncio.create_task(self._watch(proc))
        return proc

    async def _watch(self, proc: Proc) -> None:
        """Restart the process whenever it dies on its own."""
        attempt = 0
        while True:
            assert proc.process is not None
            rc = await proc.process.wait()
            proc.last_exit = rc
            if self.shutting_down or proc.state in ("stopping", "held", "stopped"):
                return
            if time.monotonic() - proc.started_at > 30:
                attempt = 0
            delay = max(proc.spec.min_restart_delay_s, backoff_delay(attempt, cap=10.0, base=0.25, jitter=0))
            attempt += 1
            proc.restarts += 1
            proc.state = "backoff"
            log.warning(
                "%s exited with code %s; restarting in %.2fs (restart #%d)", proc.spec.name, rc, delay, proc.restarts
            )
            await asyncio.sleep(delay)
            if self.shutting_down or proc.state != "backoff":
                return
            try:
                await self._spawn(proc)
            except OSError as e:
                log.error("cannot restart %s: %s", proc.spec.name, e)
                continue
            if await self._wait_healthy(proc):
                log.info("%s is back (pid %d)", proc.spec.name, proc.process.pid)
            else:
                log.warning("%s did not become healthy after restart", proc.spec.name)

    # -- stopping --------------------------------------------------------------------
    async def _terminate(self, proc: Proc) -> None:
        p = proc.process
        if p is None or p.returncode is not None:
            return
        try:
            p.send_signal(proc.spec.stop_signal)
            await asyncio.wait_for(p.wait(), proc.spec.stop_timeout_s)
        except ProcessLookupError:
            pass
        except TimeoutError:
            log.warning("%s did not stop in %.0fs; killing it", proc.spec.name, proc.spec.stop_timeout_s)
            try:
                os.killpg(p.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            await p.wait()
        (self.pids_dir / f"{proc.spec.name}.pid").unlink(missing_ok=True)

    async def stop(self, name: str, hold: bool = True) -> None:
        proc = self.procs[name]
        proc.state = "stopping"
        if proc.watcher is not None:
            proc.watcher.cancel()
        await self._terminate(proc)
        proc.state = "held" if hold else "stopped"
        log.info("%s stopped%s", name, " (held down until started)" if hold else "")

    async def restart(self, name: str) -> Proc:
        await self.stop(name)
        return await self.start(name)

    async def stop_all(self, order: list[str]) -> None:
        self.shutting_down = True
        for name in order:
            if name in self.procs:
                await self.stop(name, hold=False)

    def status(self) -> dict[str, dict]:
        return {name: proc.describe() for name, proc in self.procs.items()}
