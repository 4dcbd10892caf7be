"""``python -m stack up|down|status``: the local stack (see README)."""

from __future__ import annotations

import argparse
import asyncio
import fcntl
import json
import logging
import os
import signal
import sys
import time
from pathlib import Path

from pydantic_settings import BaseSettings, SettingsConfigDict

from common.config import load_settings_or_exit
from stack.control import ControlError, StackControl
from stack.layout import Layout
from stack.supervisor import kill_leftovers


class StackSettings(BaseSettings):
    model_config = SettingsConfigDict(case_sensitive=False, extra="ignore")

    stack_dir: Path = Path(".stack")
    port_offset: int = 0


def _layout() -> Layout:
    settings = load_settings_or_exit(StackSettings)
    return Layout(settings.stack_dir.resolve(), settings.port_offset)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _lock_free(layout: Layout) -> bool:
    """The launcher holds stack.lock until it has stopped everything (and its pid may
    linger as an unreaped zombie, so the lock is the reliable sign)."""
    path = layout.state_dir / "stack.lock"
    if not path.exists():
        return True
    fd = os.open(path, os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except BlockingIOError:
        return False
    finally:
        os.close(fd)


def down(layout: Layout, timeout_s: float = 90.0) -> int:
    pid_file = layout.state_dir / "stack.pid"
    stopped_any = False
    if pid_file.exists():
        pid = int(pid_file.read_text().strip() or 0)
        if pid and _pid_alive(pid):
            os.kill(pid, signal.SIGTERM)
            deadline = time.monotonic() + timeout_s
            while not _lock_free(layout) and time.monotonic() < deadline:
                time.sleep(0.1)
            if not _lock_free(layout) and _pid_alive(pid):
                print(f"the stack (pid {pid}) did not stop in {timeout_s:.0f}s; killing it", file=sys.stderr)
                os.kill(pid, signal.SIGKILL)
            stopped_any = True
    # Anything a SIGKILLed supervisor left behind.
    if kill_leftovers(layout.state_dir / "pids"):
        stopped_any = True
    print("stack stopped" if stopped_any else "no stack was running")
    return 0


def status(layout: Layout, as_json: bool) -> int:
    from stack.health import describe

    try:
        ctl = StackControl(layout.state_dir).status()
    except ControlError as e:
        print(f"no stack running from {layout.state_dir} ({e})")
        return 1
    report = asyncio.run(describe(layout, ctl))
    if as_json:
        print(json.dumps(report, indent=2, default=str))
    else:
        from stack.health import render

        print(render(report))
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m stack", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("up", help="start the whole stack in the foreground (Ctrl-C stops it)")
    sub.add_parser("down", help="stop a stack running elsewhere")
    st = sub.add_parser("status", help="each component with its health")
    st.add_argument("--json", action="store_true")
    args = parser.parse_args()
    layout = _layout()
    if args.command == "up":
        from stack.launcher import Stack, StackError

        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)-7s %(message)s", stream=sys.stdout)
        try:
            return asyncio.run(Stack(layout).run())
        except StackError as e:
            print(f"stack: {e}", file=sys.stderr)
            return 1
    if args.command == "down":
        return down(layout)
    return status(layout, args.json)


if __name__ == "__main__":
    sys.exit(main())
