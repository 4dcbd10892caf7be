"""Extraction: users from authen (a read replica, through :mod:`replicas`), chats and
messages from chat's MongoDB, incrementally by ``created_at``.

The MongoDB server of the local stack (nx-27017) uses an index only for ``$eq`` and
range conditions, so every query here is a range on an indexed field (or ``$in`` on
``_id``), in index order.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from typing import Any

from pymongo import ASCENDING, AsyncMongoClient
from pymongo.errors import PyMongoError
from sqlalchemy import text

from common.errors import DependencyUnavailable
from replicas import ReadWriteRouter

log = logging.getLogger("barber.etl.extract")

# Only what the analytics need: never the text of a message.
# (nx-27017 does not project sub-fields such as "sender.id": the small sender object comes whole.)
MESSAGE_FIELDS = {"chat_id": 1, "seq": 1, "sender": 1, "created_at": 1}
CHAT_FIELDS = {"customer_id": 1, "employee_id": 1, "created_at": 1}


class SourceUnavailable(Exception):
    """A source (MongoDB, authen's database) could not be read."""


class ChatSource:
    """chat's MongoDB collections, read by ``created_at`` ranges."""

    def __init__(self, url: str, db_name: str, *, timeout_ms: int = 3000) -> None:
        self.client: AsyncMongoClient = AsyncMongoClient(
            url,
            serverSelectionTimeoutMS=timeout_ms,
            connectTimeoutMS=timeout_ms,
            socketTimeoutMS=60_000,
            tz_aware=False,
        )
        self.db = self.client[db_name]

    async def close(self) -> None:
        await self.client.close()

    async def ping(self) -> bool:
        try:
            await self.db.command("ping")
            return True
        except PyMongoError:
            return False

    async def ensure_indexes(self) -> None:
        """Idempotent: the ranges below need these (chat creates only its own)."""
        try:
            await self.db.messages.create_index([("created_at", ASCENDING)], name="etl_created_at")
            await self.db.chats.create_index([("created_at", ASCENDING)], name="etl_created_at")
        except PyMongoError as e:
            raise SourceUnavailable(f"MongoDB unreachable: {e}") from e

    async def _batches(
        self, collection: str, after: float, fields: dict[str, int], size: int
    ) -> AsyncIterator[list[dict[str, Any]]]:
        cursor = (
            self.db[collection]
            .find({"created_at": {"$gt": after}}, fields)
            .sort("created_at", ASCENDING)
            .batch_size(size)
        )
        batch: list[dict[str, Any]] = []
        try:
            async for doc in cursor:
                batch.append(doc)
                if len(batch) >= size:
                    yield batch
                    batch = []
        except PyMongoError as e:
            raise SourceUnavailable(f"MongoDB unreachable while reading {collection}: {e}") from e
        finally:
            await cursor.close()
        if batch:
            yield batch

    def chats_after(self, after: float, size: int) -> AsyncIterator[list[dict[str, Any]]]:
        return self._batches("chats", after, CHAT_FIELDS, size)

    def messages_after(self, after: float, size: int) -> AsyncIterator[list[dict[str, Any]]]:
        return self._batches("messages", after, MESSAGE_FIELDS, size)

    async def chats_by_id(self, chat_ids: list[str]) -> list[dict[str, Any]]:
        if not chat_ids:
            return []
        try:
            return await self.db.chats.find({"_id": {"$in": chat_ids}}, CHAT_FIELDS).to_list()
        except PyMongoError as e:
            raise SourceUnavailable(f"MongoDB unreachable while reading chats: {e}") from e


class UserSource:
    """authen's users table through a read router (replicas first, then the primary)."""

    def __init__(self, router: ReadWriteRouter) -> None:
        self.router = router

    async def ids(self) -> set[int]:
        async def read(conn: Any) -> set[int]:
            return set((await conn.execute(text("SELECT id FROM users"))).scalars())

        return await self._read(read)

    async def rows(self, ids: list[int]) -> list[dict[str, Any]]:
        if not ids:
            return []

        async def read(conn: Any) -> list[dict[str, Any]]:
            result = await conn.execute(
                text("SELECT id, type, username, first_name, last_name, created_at FROM users WHERE id = ANY(:ids)"),
                {"ids": ids},
            )
            return [dict(r._mapping) for r in result]

        return await self._read(read)

    async def existing_on_primary(self, ids: list[int]) -> set[int]:
        """Which of ``ids`` the primary still has: a deletion is only acted on once the
        primary confirms it (a lagging replica must never delete a user from the warehouse)."""
        async with self.router.on_primary() as conn:
            result = await conn.execute(text("SELECT id FROM users WHERE id = ANY(:ids)"), {"ids": ids})
            found = set(result.scalars())
            await conn.rollback()
            return found

    async def _read(self, fn: Any) -> Any:
        try:
            return await self.router.read(fn)
        except DependencyUnavailable as e:
            raise SourceUnavailable(f"authen database unreachable: {e.detail}") from e
