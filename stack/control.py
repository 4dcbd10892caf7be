"""Talking to a running stack: a Unix socket that takes one JSON command per line.

Commands: ``status``, ``stop <name>`` (held down), ``start <name>`` (waits until healthy),
``restart <name>``, ``shutdown``. Tests use :class:`StackControl` to take parts of the
stack away and bring them back.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import socket
import tempfile
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

log = logging.getLogger("stack")

Handler = Callable[[dict], Awaitable[Any]]


def socket_path(state_dir: Path) -> Path:
    path = state_dir.resolve() / "control.sock"
    if len(str(path)) < 100:
        return path
    # Unix socket paths are limited to ~108 bytes; a deep checkout gets one in the temp dir.
    digest = hashlib.sha1(str(path).encode()).hexdigest()[:12]
    return Path(tempfile.gettempdir()) / f"barber-stack-{digest}.sock"


async def serve_control(state_dir: Path, handle: Handler) -> asyncio.AbstractServer:
    path = socket_path(state_dir)
    path.unlink(missing_ok=True)

    async def on_client(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            line = await reader.readline()
            try:
                result = {"ok": True, "result": await handle(json.loads(line))}
            except Exception as e:  # reported to the caller, the supervisor keeps running
                result = {"ok": False, "error": f"{type(e).__name__}: {e}"}
            writer.write(json.dumps(result).encode() + b"\n")
            await writer.drain()
        finally:
            writer.close()

    server = await asyncio.start_unix_server(on_client, path=str(path))
    path.chmod(0o600)
    return server


class ControlError(Exception):
    pass


class StackControl:
    def __init__(self, state_dir: Path, timeout_s: float = 180.0) -> None:
        self.path = socket_path(Path(state_dir))
        self.timeout_s = timeout_s

    def call(self, cmd: str, **args: Any) -> Any:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(self.timeout_s)
            try:
                s.connect(str(self.path))
            except OSError as e:
                raise ControlError(f"no stack is answering at {self.path}: {e.strerror}") from e
            s.sendall(json.dumps({"cmd": cmd, **args}).encode() + b"\n")
            data = b""
            while not data.endswith(b"\n"):
                chunk = s.recv(65536)
                if not chunk:
                    break
                data += chunk
        reply = json.loads(data)
        if not reply["ok"]:
            raise ControlError(reply["error"])
        return reply["result"]

    def status(self) -> dict[str, Any]:
        return self.call("status")

    def pid(self, name: str) -> int | None:
        return self.status()["processes"][name]["pid"]

    def stop(self, name: str) -> None:
        self.call("stop", name=name)

    def start(self, name: str) -> None:
        self.call("start", name=name)

    def restart(self, name: str) -> None:
        self.call("restart", name=name)

    def shutdown(self) -> None:
        self.call("shutdown")
