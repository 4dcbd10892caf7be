"""Helpers (no tests) for the gateway tests: tokens, dedicated gateways, an echo upstream.

The echo upstream is a test fixture, not product code: a Tornado server in the test
process that registers itself in the stack's discovery under a type of its own
("echotest"), so a gateway started with GATEWAY_SERVICES including it routes to it and
the test can see exactly what arrived upstream (headers, body, frames).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import tornado.web
import tornado.websocket
from tornado.httpserver import HTTPServer

from common.discovery import Registration
from common.internal import read_secret
from common.tokens import TokenSigner
from tests.procs import ServiceProcess, start_service
from tests.stackproc import service_headers
from tests.util import free_port, wait_until

ECHO_TYPE = "echotest"


def token_for(stack: Any, user_id: int = 7, user_type: str = "customer", ttl_s: int = 600) -> str:
    return TokenSigner.from_file(stack.layout.jwt_private_key, ttl_s=ttl_s).issue(user_id, user_type)


async def start_gateway(stack: Any, **env: str | int) -> ServiceProcess:
    """A gateway of our own, with special settings, beside the stack's. It routes the
    test-only sleepy endpoint, as the stack's gateway does, unless ``enable_sleepy=0``."""
    env = {"enable_sleepy": 1, **env}
    return await start_service(
        stack, "gateway", extra_env={k.upper(): str(v) for k, v in env.items()}, health_path="/status"
    )


class Reply:
    def __init__(self, status: int, headers: Any, body: bytes) -> None:
        self.status = status
        self.headers = headers
        self.body = body
        try:
            self.json: Any = json.loads(body) if body else None
        except ValueError:
            self.json = None

    def __repr__(self) -> str:
        return f"<{self.status} {self.body[:300]!r}>"


async def fetch(
    http: aiohttp.ClientSession,
    method: str,
    url: str,
    *,
    headers: Any = None,
    body: Any = None,
    data: bytes | None = None,
    timeout: float = 30,
) -> Reply:
    if body is not None:
        data = json.dumps(body).encode()
        headers = {"Content-Type": "application/json", **(headers or {})}
    async with http.request(
        method, url, headers=headers, data=data, allow_redirects=False, timeout=aiohttp.ClientTimeout(total=timeout)
    ) as r:
        return Reply(r.status, r.headers, await r.read())


async def gateway_status(http: aiohttp.ClientSession, gw_url: str) -> dict:
    return (await fetch(http, "GET", gw_url + "/status", headers=service_headers())).json


async def gateway_instances(http: aiohttp.ClientSession, gw_url: str, service: str = "authen") -> dict[str, dict]:
    st = await gateway_status(http, gw_url)
    return {i["address"]: i for i in st["services"][service]["instances"]}


async def authen_status(http: aiohttp.ClientSession, stack: Any, index: int) -> dict:
    return (
        await fetch(http, "GET", stack.url("authen", index) + "/utilities/status", headers=stack.service_headers())
    ).json


async def sleepy_received(http: aiohttp.ClientSession, stack: Any) -> int:
    total = 0
    for i in (0, 1):
        total += (await authen_status(http, stack, i))["sleepy"]["received"]
    return total


def authen_addresses(stack: Any) -> list[str]:
    return [f"127.0.0.1:{p}" for p in stack.layout.ports("authen")]


def log_events(proc: ServiceProcess) -> list[dict]:
    out = []
    for line in proc.log_path.read_text(errors="replace").splitlines():
        try:
            out.append(json.loads(line))
        except ValueError:
            continue
    return out


# -- raw HTTP: requests no well-behaved client library would send ---------------------------
class Raw:
    """One TCP connection to a server, written and read byte for byte."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    @classmethod
    async def open(cls, base_url: str) -> Raw:
        host, port = base_url.removeprefix("http://").split(":")
        return cls(*await asyncio.open_connection(host, int(port)))

    async def send(self, data: bytes) -> None:
        self.writer.write(data)
        await self.writer.drain()

    async def response(self, timeout: float = 20) -> tuple[int, dict[str, str], bytes]:
        """One response (status, headers, body); the body by Content-Length, else to EOF."""
        async with asyncio.timeout(timeout):
            head = await self.reader.readuntil(b"\r\n\r\n")
            lines = head.decode("latin-1").split("\r\n")
            status = int(lines[0].split(" ")[1])
            headers = {k.strip().lower(): v.strip() for k, _, v in (ln.partition(":") for ln in lines[1:] if ln)}
            if "content-length" in headers:
                body = await self.reader.readexactly(int(headers["content-length"]))
            else:
                body = await self.reader.read()
        return status, headers, body

    async def closed_by_peer(self) -> bool:
        """Whether the server has closed the connection (reads whatever is left)."""
        try:
            return await asyncio.wait_for(self.reader.read(65536), 0.05) == b""
        except TimeoutError:
            return False
        except ConnectionError:
            return True

    def close(self) -> None:
        self.writer.close()


def request(method: str, target: str, *headers: str, body: bytes = b"") -> bytes:
    lines = [f"{method} {target} HTTP/1.1", "Host: gw.test", *headers]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


# -- the echo upstream -------------------------------------------------------------------
class EchoHandler(tornado.web.RequestHandler):
    SUPPORTED_METHODS = ("GET", "HEAD", "POST", "DELETE", "PATCH", "PUT", "OPTIONS")

    def compute_etag(self) -> None:
        return None

    async def _echo(self) -> None:
        status = int(self.get_query_argument("status", "200"))
        delay = float(self.get_query_argument("delay", "0"))
        if delay > 0:
            await asyncio.sleep(delay)  # an upstream that is slow on purpose
        self.set_status(status)
        self.set_header("Content-Type", "application/json")
        self.add_header("Set-Cookie", "a=1")
        self.add_header("Set-Cookie", "b=2")
        self.set_header("X-Upstream", "echo")
        self.finish(
            json.dumps(
                {
                    "method": self.request.method,
                    "path": self.request.path,
                    "query": self.request.query,
                    "headers": list(self.request.headers.get_all()),
                    "body": self.request.body.decode(errors="replace"),
                }
            )
        )

    get = post = put = patch = delete = options = _echo


# Close codes the echo socket received from its clients (the gateway), newest last.
ECHO_CLOSES: list[int | None] = []


class EchoSocket(tornado.websocket.WebSocketHandler):
    def on_close(self) -> None:
        ECHO_CLOSES.append(self.close_code)

    def select_subprotocol(self, subprotocols: list[str]) -> str | None:
        return "bearer" if "bearer" in subprotocols else None

    def open(self) -> None:
        self.write_message(
            json.dumps(
                {
                    "x_user": self.request.headers.get("X-User"),
                    "x_request_id": self.request.headers.get("X-Request-ID"),
                    "query": self.request.query,
                }
            )
        )

    def on_message(self, message: str | bytes) -> None:
        if isinstance(message, str) and message.startswith("close:"):
            self.close(int(message.split(":")[1]), "bye")
            return
        self.write_message(message, binary=isinstance(message, bytes))


@contextlib.asynccontextmanager
async def echo_upstream(stack: Any) -> AsyncIterator[str]:
    """Serve the echo app and register it as ``echotest``; yields its address."""
    port = free_port()
    app = tornado.web.Application([(r"/ws", EchoSocket), (r"/.*", EchoHandler)])
    server = HTTPServer(app)
    server.listen(port, "127.0.0.1")
    reg = Registration(
        stack.layout.discovery_url, ECHO_TYPE, "127.0.0.1", port, read_secret(stack.layout.service_secret)
    )
    reg.start()
    try:
        await asyncio.wait_for(reg.registered.wait(), 10)
        yield f"127.0.0.1:{port}"
    finally:
        await reg.stop()
        server.stop()
        await server.close_all_connections()


async def wait_routed(http: aiohttp.ClientSession, gw_url: str, service: str, count: int, timeout: float = 30) -> None:
    """Until the gateway routes to ``count`` instances, none of them with an open breaker
    (an earlier test may have taken one away; half-open lets trial requests through)."""

    async def ready() -> bool:
        instances = await gateway_instances(http, gw_url, service)
        return len(instances) == count and all(i["breaker"]["state"] != "open" for i in instances.values())

    await wait_until(ready, timeout=timeout, message=f"{count} {service} instance(s) in the gateway's view")


class Stream:
    """A steady, bounded stream of sequential GETs through a gateway, recording outcomes."""

    def __init__(self, http: aiohttp.ClientSession, url: str, max_requests: int = 20000) -> None:
        self.http = http
        self.url = url
        self.max_requests = max_requests
        self.results: list[tuple[float, int, str | None]] = []
        self._stop = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    async def _run(self) -> None:
        while not self._stop.is_set() and len(self.results) < self.max_requests:
            try:
                r = await fetch(self.http, "GET", self.url, timeout=15)
                inst = r.json.get("instance") if isinstance(r.json, dict) else None
                self.results.append((time.monotonic(), r.status, inst))
            except (aiohttp.ClientError, TimeoutError) as e:
                self.results.append((time.monotonic(), 0, repr(e)))
            await asyncio.sleep(0.005)  # pacing of the stream, not a wait for a condition

    def start(self) -> Stream:
        self._task = asyncio.create_task(self._run())
        return self

    async def stop(self) -> None:
        self._stop.set()
        if self._task is not None:
            await self._task

    def errors(self, since: float = 0.0) -> list[tuple[float, int, str | None]]:
        return [r for r in self.results if r[0] >= since and r[1] != 200]

    def served_by(self, address: str, since: float = 0.0) -> int:
        return sum(1 for t, s, inst in self.results if t >= since and s == 200 and inst == address)
