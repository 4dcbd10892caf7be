"""Helpers (no tests) shared by the authen and replicas tests: HTTP calls, users, status."""

from __future__ import annotations

import contextlib
import json
import uuid
from typing import Any, AsyncIterator

import psycopg
from tornado.httpclient import AsyncHTTPClient


class Reply:
    def __init__(self, code: int, body: bytes, headers: Any) -> None:
        self.code = code
        self.raw = body
        self.headers = headers
        try:
            self.json: Any = json.loads(body) if body else None
        except ValueError:
            self.json = None

    def __repr__(self) -> str:
        return f"<{self.code} {self.raw[:300]!r}>"


async def call(method: str, url: str, body: Any = None, *, raw: bytes | None = None,
               headers: dict[str, str] | None = None, timeout: float = 20.0) -> Reply:
    hdrs = dict(headers or {})
    data: bytes | None = raw
    if body is not None:
        data = json.dumps(body).encode()
        hdrs.setdefault("Content-Type", "application/json")
    if data is None and method in ("POST", "PUT"):
        data = b""
    resp = await AsyncHTTPClient().fetch(
        url, method=method, body=data, headers=hdrs, request_timeout=timeout, raise_error=False,
        allow_nonstandard_methods=True,
    )
    return Reply(resp.code, resp.body or b"", resp.headers)


def new_username(prefix: str = "u") -> str:
    return f"{prefix}_{uuid.uuid4().hex[:12]}"


def user_body(username: str | None = None, *, type_: str = "customer", password: str = "correct horse") -> dict:
    return {
        "username": username or new_username(),
        "password": password,
        "first_name": "Ada",
        "last_name": "Lovelace",
        "type": type_,
    }


async def signup(base: str, **kw: Any) -> tuple[dict, Reply]:
    body = user_body(**kw)
    reply = await call("POST", base + "/authen/signup", body)
    return body, reply


async def status(base: str) -> dict:
    reply = await call("GET", base + "/utilities/status")
    assert reply.code == 200, reply
    return reply.json


# -- replication control (connects straight to the replicas as the stack's superuser) --------
@contextlib.asynccontextmanager
async def replay_paused(stack: Any, indexes: tuple[int, ...] = (1, 2)) -> AsyncIterator[None]:
    """Pause WAL replay on the given replicas; ALWAYS resume on the way out."""
    conns = []
    try:
        for i in indexes:
            conn = await psycopg.AsyncConnection.connect(stack.layout.pg_dsn("authen", i), autocommit=True,
                                                         connect_timeout=5)
            conns.append(conn)
            await conn.execute("SELECT pg_wal_replay_pause()")
        yield
    finally:
        for conn in conns:
            try:
                await conn.execute("SELECT pg_wal_replay_resume()")
            finally:
                await conn.close()


async def on_replica(stack: Any, index: int, sql: str, params: tuple = ()) -> Any:
    async with await psycopg.AsyncConnection.connect(stack.layout.pg_dsn("authen", index), autocommit=True,
                                                     connect_timeout=5) as conn:
        return await (await conn.execute(sql, params)).fetchone()
