"""Extra service instances for tests that need special settings (a gateway with a task
limit of 1, an authen reading only from the primary, ...): the real `python -m <module>`
with the stack's environment plus the test's overrides."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from typing import Any

from tornado.httpclient import AsyncHTTPClient

from stack.layout import signing_env
from stack.services import signs_tokens
from tests.stackproc import ROOT, StackProcess, _die_with_parent
from tests.util import free_port, wait_until


class ServiceProcess:
    def __init__(
        self,
        stack: StackProcess,
        module: str,
        port: int | None = None,
        extra_env: dict[str, str] | None = None,
        name: str | None = None,
        health_path: str = "/utilities/status",
    ) -> None:
        self.stack = stack
        self.module = module
        self.port = port or free_port()
        self.name = name or f"{module}-{self.port}"
        self.health_path = health_path
        signing = signing_env(stack.layout) if signs_tokens(module) else {}
        self.env = {
            **os.environ,
            **stack.env,
            **signing,
            "PORT": str(self.port),
            "ADVERTISE_HOST": "127.0.0.1",
            **(extra_env or {}),
        }
        self.process: subprocess.Popen[bytes] | None = None
        self.log_path = stack.layout.logs_dir / f"test-{self.name}.log"

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    async def healthy(self) -> bool:
        resp = await AsyncHTTPClient().fetch(self.url + self.health_path, request_timeout=2, raise_error=False)
        return resp.code == 200

    async def start(self, timeout: float = 30.0) -> ServiceProcess:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "ab") as out:
            self.process = subprocess.Popen(
                [sys.executable, "-m", self.module],
                cwd=ROOT,
                env=self.env,
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                preexec_fn=_die_with_parent,
            )

        async def ready() -> bool:
            if self.process is not None and self.process.poll() is not None:
                raise RuntimeError(f"{self.name} exited with {self.process.returncode}: {self.tail()}")
            return await self.healthy()

        await wait_until(ready, timeout=timeout, interval=0.1, message=f"{self.name} healthy")
        return self

    def tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def kill(self, sig: int = signal.SIGKILL) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(sig)

    def terminate(self) -> None:
        self.kill(signal.SIGTERM)

    async def wait_exit(self, timeout: float = 30.0) -> int:
        assert self.process is not None
        await wait_until(lambda: self.process.poll() is not None, timeout=timeout, message=f"{self.name} exit")
        return self.process.returncode

    async def restart(self, timeout: float = 30.0) -> ServiceProcess:
        if self.process is not None and self.process.poll() is None:
            self.terminate()
            await self.wait_exit()
        return await self.start(timeout)

    async def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.terminate()
            try:
                await self.wait_exit(20)
            except AssertionError:
                self.kill()
                await self.wait_exit(5)

    async def __aenter__(self) -> ServiceProcess:
        if self.process is None:
            await self.start()
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self.stop()


async def start_service(
    stack: StackProcess,
    module: str,
    port: int | None = None,
    extra_env: dict[str, str] | None = None,
    name: str | None = None,
    health_path: str = "/utilities/status",
) -> ServiceProcess:
    return await ServiceProcess(stack, module, port, extra_env, name, health_path).start()
