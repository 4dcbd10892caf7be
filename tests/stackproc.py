"""Running the real launcher (`python -m stack up`) from tests, under a state folder and offset."""

from __future__ import annotations

import ctypes
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

from common.internal import SERVICE_TOKEN_HEADER, read_secret
from stack.control import ControlError, StackControl
from stack.layout import Layout, service_env
from tests.util import wait_until_sync

ROOT = Path(__file__).resolve().parent.parent
# The stack creates this admin account (the deletion coordinator's tests sign in with it).
# Against a running stack (BARBER_TEST_STACK=running) they are the ones it was started with.
ADMIN_USERNAME = os.environ.get("BARBER_ADMIN_USERNAME") or "admin"
ADMIN_PASSWORD = os.environ.get("BARBER_ADMIN_PASSWORD") or "admin-password-for-tests"
_libc = ctypes.CDLL(None, use_errno=True)


def _die_with_parent() -> None:
    _libc.prctl(1, signal.SIGTERM, 0, 0, 0)  # PR_SET_PDEATHSIG: no orphan stack if pytest dies


class StackProcess:
    """A whole local stack started by the real launcher, for the length of a test session."""

    # The session's stack, for helpers that only get a URL (service_headers). Set by the
    # session fixture, not by start(): a test's second stack must not take its place.
    current: StackProcess | None = None

    def __init__(self, port_offset: int, state_dir: Path | None = None) -> None:
        self.state_dir = state_dir or Path(tempfile.mkdtemp(prefix="barber-stack-"))
        self.layout = Layout(self.state_dir, port_offset)
        self.env = service_env(self.layout)
        self.control = StackControl(self.state_dir)
        self.process: subprocess.Popen[bytes] | None = None
        self.output = self.state_dir / "stack-up.log"

    def url(self, port_key: str, index: int = 0) -> str:
        return f"http://127.0.0.1:{self.layout.port(port_key, index)}"

    def command_env(self) -> dict[str, str]:
        return {
            **os.environ,
            "STACK_DIR": str(self.state_dir),
            "PORT_OFFSET": str(self.layout.port_offset),
            "BARBER_ADMIN_USERNAME": ADMIN_USERNAME,
            "BARBER_ADMIN_PASSWORD": ADMIN_PASSWORD,
        }

    def start(self, timeout_s: float = 240.0) -> None:
        self.state_dir.mkdir(parents=True, exist_ok=True)
        with open(self.output, "ab") as out:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "stack", "up"],
                cwd=ROOT,
                env=self.command_env(),
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                preexec_fn=_die_with_parent,
            )

        def settled() -> bool:
            return (self.process is not None and self.process.poll() is not None) or self.ready()

        try:
            wait_until_sync(settled, timeout=timeout_s, poll_interval=0.2, message="the stack ready")
        except AssertionError as e:
            self.stop()
            raise RuntimeError(f"the stack was not ready in {timeout_s}s:\n{self.tail()}") from e
        if self.process.poll() is not None:
            raise RuntimeError(f"the stack exited with {self.process.returncode}:\n{self.tail()}")

    def ready(self) -> bool:
        """The launcher says every component is healthy (False while it cannot be asked)."""
        try:
            return bool(self.control.status()["ready"])
        except (ControlError, OSError, ValueError):
            return False

    def service_headers(self) -> dict[str, str]:
        """The service credential, which status details (addresses, counters) require."""
        return {SERVICE_TOKEN_HEADER: read_secret(self.layout.service_secret)}

    def tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.output.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def stop(self, timeout_s: float = 120.0) -> int | None:
        if self.process is None:
            return None
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        return self.process.returncode

    def remove(self) -> None:
        shutil.rmtree(self.state_dir, ignore_errors=True)


class RunningStack(StackProcess):
    """A stack started elsewhere (`make up`), which the suite attaches to instead of starting
    its own (BARBER_TEST_STACK=running). It is never stopped or removed by the suite; the
    fault tests stop and start its parts through the same control socket and put them back."""

    def start(self, timeout_s: float = 60.0) -> None:
        try:
            wait_until_sync(self.ready, timeout=timeout_s, poll_interval=0.5, message="the running stack ready")
        except AssertionError as e:
            raise RuntimeError(
                f"BARBER_TEST_STACK=running, but no ready stack answers on {self.state_dir}'s control socket: "
                "start one with `make up` (STACK_DIR and PORT_OFFSET as it was started with)"
            ) from e
        gateway = self.control.status()["processes"].get("gateway", {})
        if self.layout.port("gateway") not in gateway.get("ports", []):
            raise RuntimeError(
                f"the stack in {self.state_dir} does not serve its gateway on port {self.layout.port('gateway')}: "
                f"it runs under another PORT_OFFSET than {self.layout.port_offset}"
            )

    def stop(self, timeout_s: float = 120.0) -> int | None:
        return None

    def remove(self) -> None:
        return None


def service_headers() -> dict[str, str]:
    """The running session stack's service credential (empty before a stack started)."""
    return StackProcess.current.service_headers() if StackProcess.current is not None else {}
