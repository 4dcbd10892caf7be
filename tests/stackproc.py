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
ADMIN_USERNAME = "admin"
ADMIN_PASSWORD = "admin-password-for-tests"
_libc = ctypes.CDLL(None, use_errno=True)


def _die_with_parent() -> None:
    _libc.prctl(1, signal.SIGTERM, 0, 0, 0)  # PR_SET_PDEATHSIG: no orphan stack if pytest dies


class StackProcess:
    """A whole local stack started by the real launcher, for the length of a test session."""

    # The session's stack, for helpers that only get a URL (service_headers).
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
        return {**os.environ, "STACK_DIR": str(self.state_dir), "PORT_OFFSET": str(self.layout.port_offset),
                "BARBER_ADMIN_USERNAME": ADMIN_USERNAME, "BARBER_ADMIN_PASSWORD": ADMIN_PASSWORD}

    def start(self, timeout_s: float = 240.0) -> None:
        StackProcess.current = self
        self.state_dir.mkdir(parents=True, exist_ok=True)
        with open(self.output, "ab") as out:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "stack", "up"], cwd=ROOT, env=self.command_env(),
                stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, preexec_fn=_die_with_parent,
            )
        def settled() -> bool:
            if self.process is not None and self.process.poll() is not None:
                return True
            try:
                return bool(self.control.status()["ready"])
            except (ControlError, OSError, ValueError):
                return False

        try:
            wait_until_sync(settled, timeout=timeout_s, poll_interval=0.2, message="the stack ready")
        except AssertionError as e:
            self.stop()
            raise RuntimeError(f"the stack was not ready in {timeout_s}s:\n{self.tail()}") from e
        if self.process.poll() is not None:
            raise RuntimeError(f"the stack exited with {self.process.returncode}:\n{self.tail()}")

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


def service_headers() -> dict[str, str]:
    """The running session stack's service credential (empty before a stack started)."""
    return StackProcess.current.service_headers() if StackProcess.current is not None else {}
