"""Helpers (no tests) for the chat tests: users from the real authen, socket clients, status."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import socket
import uuid
from dataclasses import dataclass, field
from typing import Any

from tornado.httpclient import HTTPRequest
from tornado.websocket import WebSocketClientConnection, websocket_connect

from tests.http import call
from tests.stackproc import StackProcess, service_headers
from tests.util import wait_until


@dataclass
class ChatUser:
    id: int
    token: str
    type: str
    username: str
    first_name: str
    last_name: str


async def make_user(
    stack: StackProcess, type_: str = "customer", first_name: str = "Ada", last_name: str = "Lovelace"
) -> ChatUser:
    """A real user: signed up and signed in through authen."""
    authen = stack.url("authen", 0)
    username = f"{type_[:4]}_{uuid.uuid4().hex[:12]}"
    body = {
        "username": username,
        "password": "correct horse",
        "first_name": first_name,
        "last_name": last_name,
        "type": type_,
    }
    reply = await call("POST", authen + "/authen/signup", body)
    assert reply.code == 201, reply
    reply = await call("POST", authen + "/authen/signin", {"username": username, "password": "correct horse"})
    assert reply.code == 200, reply
    return ChatUser(reply.json["user_id"], reply.json["token"], type_, username, first_name, last_name)


async def start_chat(base: str, customer: ChatUser, employee: ChatUser) -> str:
    reply = await call("POST", f"{base}/chats/start?employee_id={employee.id}", token=customer.token)
    assert reply.code in (200, 201), reply
    return reply.json["chat_id"]


async def status(base: str) -> dict:
    reply = await call("GET", base + "/utilities/status", headers=service_headers())
    assert reply.code == 200, reply
    return reply.json


def ws_of(http_base: str) -> str:
    return "ws" + http_base[len("http") :]


def socket_url(
    http_base: str, chat_id: str, token: str | None = None, since: int | None = None, via_gateway: bool = False
) -> str:
    path = f"/chat/chat/{chat_id}" if via_gateway else f"/chat/{chat_id}"
    query = []
    if token is not None:
        query.append(f"token={token}")
    if since is not None:
        query.append(f"since={since}")
    return ws_of(http_base) + path + ("?" + "&".join(query) if query else "")


@dataclass
class ChatClient:
    """A socket client that reads every frame in the background."""

    conn: WebSocketClientConnection
    frames: list[dict] = field(default_factory=list)
    close_code: int | None = None
    close_reason: str | None = None
    closed: asyncio.Event = field(default_factory=asyncio.Event)
    _reader: asyncio.Task | None = None

    @classmethod
    async def connect(
        cls, url: str, subprotocols: list[str] | None = None, headers: dict[str, str] | None = None
    ) -> ChatClient:
        req = HTTPRequest(url, headers=headers or {}, request_timeout=10)
        conn = await websocket_connect(req, subprotocols=subprotocols)
        client = cls(conn)
        client._reader = asyncio.create_task(client._read())
        return client

    async def _read(self) -> None:
        while True:
            msg = await self.conn.read_message()
            if msg is None:
                self.close_code = self.conn.close_code
                self.close_reason = self.conn.close_reason
                self.closed.set()
                return
            self.frames.append(json.loads(msg))

    @property
    def messages(self) -> list[dict]:
        return [f for f in self.frames if f.get("type") == "chat_message"]

    @property
    def errors(self) -> list[dict]:
        return [f for f in self.frames if f.get("type") == "error"]

    @property
    def seqs(self) -> list[int]:
        return [m["seq"] for m in self.messages]

    @property
    def last_seq(self) -> int:
        return self.seqs[-1] if self.messages else 0

    async def send(self, text: str, client_id: str | None = None, **extra: Any) -> None:
        frame: dict[str, Any] = {"type": "chat_message", "message": text, **extra}
        if client_id is not None:
            frame["client_id"] = client_id
        await self.conn.write_message(json.dumps(frame))

    async def send_raw(self, data: str) -> None:
        await self.conn.write_message(data)

    async def wait_messages(self, n: int, timeout: float = 15.0) -> list[dict]:
        await wait_until(
            lambda: len(self.messages) >= n,
            timeout=timeout,
            message=f"{n} messages (have {len(self.messages)}: {self.seqs[-5:]})",
        )
        return self.messages

    async def wait_errors(self, n: int, timeout: float = 10.0) -> list[dict]:
        await wait_until(lambda: len(self.errors) >= n, timeout=timeout, message=f"{n} error frames")
        return self.errors

    async def wait_closed(self, timeout: float = 10.0) -> int | None:
        await asyncio.wait_for(self.closed.wait(), timeout)
        return self.close_code

    async def close(self) -> None:
        self.conn.close()
        try:
            await asyncio.wait_for(self.closed.wait(), 5)
        except TimeoutError:
            pass
        if self._reader is not None:
            self._reader.cancel()


async def refused_with(
    url: str, subprotocols: list[str] | None = None, headers: dict[str, str] | None = None
) -> int | None:
    """Connect and return the close code the server closes with (None if it stays open)."""
    client = await ChatClient.connect(url, subprotocols, headers)
    try:
        return await client.wait_closed(10)
    except TimeoutError:
        await client.close()
        return None


class RawSocket:
    """A WebSocket client that completes the handshake and then never reads.

    Its receive buffer is shrunk first, so the server's frames back up quickly."""

    def __init__(self, host: str, port: int, path: str, rcvbuf: int = 4096) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        self.sock.settimeout(10)
        self.sock.connect((host, port))
        key = base64.b64encode(os.urandom(16)).decode()
        self.sock.sendall(
            (
                f"GET {path} HTTP/1.1\r\nHost: {host}:{port}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n"
            ).encode()
        )
        head = b""
        while b"\r\n\r\n" not in head:
            chunk = self.sock.recv(1)
            if not chunk:
                raise ConnectionError("closed during the handshake")
            head += chunk
        assert head.startswith(b"HTTP/1.1 101"), head

    def drain_until_closed(self, limit_bytes: int = 64 * 1024 * 1024) -> int:
        """Read everything until the server closes the connection; the byte count."""
        total = 0
        self.sock.settimeout(20)
        while total < limit_bytes:
            try:
                chunk = self.sock.recv(65536)
            except ConnectionResetError:
                return total
            if not chunk:
                return total
            total += len(chunk)
        raise AssertionError("the server never closed the connection")

    def close(self) -> None:
        self.sock.close()


def new_client_id() -> str:
    return uuid.uuid4().hex[:16]
