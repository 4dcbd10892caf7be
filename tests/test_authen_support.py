"""Helpers (no tests) shared by the authen and replicas tests: HTTP calls, users, status."""

from __future__ import annotations

import contextlib
import uuid
from collections.abc import AsyncIterator
from typing import Any

import psycopg

from tests.http import Reply, call
from tests.stackproc import service_headers


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
    reply = await call("GET", base + "/utilities/status", headers=service_headers())
    assert reply.code == 200, reply
    return reply.json


# -- replication control (connects straight to the replicas as the stack's superuser) --------
@contextlib.asynccontextmanager
async def replay_paused(stack: Any, indexes: tuple[int, ...] = (1, 2)) -> AsyncIterator[None]:
    """Pause WAL replay on the given replicas; ALWAYS resume on the way out."""
    conns = []
    try:
        for i in indexes:
            conn = await psycopg.AsyncConnection.connect(
                stack.layout.pg_dsn("authen", i), autocommit=True, connect_timeout=5
            )
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
    async with await psycopg.AsyncConnection.connect(
        stack.layout.pg_dsn("authen", index), autocommit=True, connect_timeout=5
    ) as conn:
        return await (await conn.execute(sql, params)).fetchone()
