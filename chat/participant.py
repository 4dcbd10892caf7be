"""chat as a participant of the deletion coordinator.

MongoDB has no prepared transactions, so "prepared" is a durable mark: every chat of the
user gets ``deleting = <gid>`` (sockets closed with 4409 on every instance, new
connections, starts and messages refused), and ``participant_tx`` records the
transaction. Commit deletes the user's chats and messages and invalidates the user's
cache entry; abort clears the marks. An abort for a transaction never seen here is
recorded, so a prepare arriving after it is refused.

Saga steps: purge (delete the user's chats and messages, one batch per call) and cache
invalidation.

Every function is idempotent: the coordinator repeats calls after crashes. Queries use
``$eq`` and ranges only (the embedded server scans tables for anything else).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

from pymongo import ASCENDING
from pymongo.errors import DuplicateKeyError

from chat.cache import CacheError, UserCache
from chat.chats import CLOSE_DELETING, CLOSE_NOT_FOUND
from chat.fanout import Hub
from chat.store import Store, unavailable
from common.errors import Conflict, ServiceUnavailable
from common.participant import GID_PREFIX, check_gid

log = logging.getLogger("barber.chat.participant")


class ChatParticipant:
    def __init__(self, store: Store, hub: Hub, cache: UserCache) -> None:
        self.store = store
        self.hub = hub
        self.cache = cache
        self.txs = store.db["participant_tx"]

    async def _record(self, gid: str) -> dict[str, Any] | None:
        return await self.txs.find_one({"_id": {"$eq": gid}})

    async def state_of(self, gid: str) -> str:
        check_gid(gid)
        with unavailable("chat"):
            doc = await self._record(gid)
        return doc["state"] if doc else "unknown"

    # -- two-phase commit --------------------------------------------------------------
    async def prepare(self, gid: str, user_id: int, after_prepare: Callable[[], None] | None = None) -> str:
        check_gid(gid)
        with unavailable("chat"):
            doc = await self._record(gid)
            if doc is not None and doc["state"] != "prepared":
                if doc["state"] == "aborted":
                    raise Conflict(f"transaction {gid} was already aborted here")
                return doc["state"]
            chats = await self.store.chats_of(user_id)
            if doc is None:
                try:
                    # Recorded first: an abort racing with this prepare then finds it.
                    await self.txs.insert_one(
                        {
                            "_id": gid,
                            "user_id": user_id,
                            "state": "prepared",
                            "chat_ids": [c.chat_id for c in chats],
                            "at": time.time(),
                        }
                    )
                except DuplicateKeyError:
                    return await self.prepare(gid, user_id, after_prepare)
            # A repeated prepare (the first one may have died half-way) marks again: "yes"
            # is only ever answered once every chat of the user carries the mark.
            for chat in chats:
                await self._mark(chat.chat_id, gid)
            if (await self._record(gid) or {}).get("state") == "aborted":
                # An abort overtook us: undo the marks it could not see.
                await self._clear_marks(gid)
                raise Conflict(f"transaction {gid} was aborted while preparing")
        for chat in chats:
            await self.hub.close_chat_everywhere(chat.chat_id, CLOSE_DELETING, "chat is being deleted")
        log.info("prepared %s: %d chat(s) of user %d marked", gid, len(chats), user_id)
        if doc is None and after_prepare is not None:
            after_prepare()
        return "prepared"

    async def _mark(self, chat_id: str, gid: str) -> None:
        """Mark a chat for ``gid`` unless another deletion holds it (then vote no)."""
        result = await self.store.chats.update_one(
            {"_id": {"$eq": chat_id}, "deleting": {"$eq": None}}, {"$set": {"deleting": gid}}
        )
        if result.matched_count:
            return
        current = await self.store.get_chat(chat_id)
        if current is not None and current.deleting not in (None, gid):
            raise Conflict(f"chat {chat_id} is being deleted by another transaction")

    async def commit(self, gid: str) -> str:
        check_gid(gid)
        with unavailable("chat"):
            doc = await self._record(gid)
            if doc is None:
                raise Conflict(f"transaction {gid} was never prepared here")
            if doc["state"] == "aborted":
                raise Conflict(f"transaction {gid} was aborted here; it cannot commit")
            if doc["state"] == "committed":
                return "committed"
            user_id = int(doc["user_id"])
        # First, so that no new chat with the user can start from a cached entry (authen
        # already answers 404: it commits before chat).
        await self.invalidate(user_id)
        with unavailable("chat"):
            # The marked chats, and any the user started since (commit removes them all).
            chat_ids = set(doc.get("chat_ids", [])) | {c.chat_id for c in await self.store.chats_of(user_id)}
            for chat_id in sorted(chat_ids):
                await self._delete_chat(chat_id)
            # A write already on its way when the chat was closed may land after the
            # first sweep; the second takes it too.
            for chat_id in sorted(chat_ids):
                await self.store.messages.delete_many({"chat_id": {"$eq": chat_id}})
        with unavailable("chat"):
            await self.txs.update_one({"_id": {"$eq": gid}}, {"$set": {"state": "committed", "at": time.time()}})
        log.info("committed %s: user %d's %d chat(s) deleted", gid, user_id, len(chat_ids))
        return "committed"

    async def abort(self, gid: str) -> str:
        check_gid(gid)
        with unavailable("chat"):
            doc = await self._record(gid)
            if doc is not None and doc["state"] == "committed":
                raise Conflict(f"transaction {gid} was committed here; it cannot abort")
            if doc is None:
                try:
                    await self.txs.insert_one({"_id": gid, "state": "aborted", "at": time.time()})
                except DuplicateKeyError:
                    return await self.abort(gid)  # a prepare got there first
            else:
                await self.txs.update_one({"_id": {"$eq": gid}}, {"$set": {"state": "aborted", "at": time.time()}})
            await self._clear_marks(gid)
        log.info("aborted %s", gid)
        return "aborted"

    async def _clear_marks(self, gid: str) -> None:
        await self.store.chats.update_many({"deleting": {"$eq": gid}}, {"$set": {"deleting": None}})

    async def prepared(self, older_than_s: float = 0.0) -> list[dict[str, Any]]:
        """Transactions holding anything here: prepared records, and marks left on chats by
        a prepare that died after its transaction was aborted (recovery's abort clears them)."""
        with unavailable("chat"):
            docs = await self.txs.find({"state": {"$eq": "prepared"}}).to_list()
            marked = await self.store.chats.find(
                {"deleting": {"$gte": GID_PREFIX, "$lt": GID_PREFIX[:-1] + chr(ord(GID_PREFIX[-1]) + 1)}},
                {"deleting": 1},
            ).to_list()
        cutoff = time.time() - older_than_s
        held = {
            d["_id"]: {"gid": d["_id"], "user_id": d.get("user_id"), "prepared_at": d.get("at")}
            for d in docs
            if d.get("at", 0) <= cutoff
        }
        for chat in marked:
            if chat["deleting"] not in held and not older_than_s:
                held[chat["deleting"]] = {"gid": chat["deleting"], "user_id": None, "prepared_at": None}
        return list(held.values())

    async def stale_prepared(self, older_than_s: float) -> list[str]:
        return [t["gid"] for t in await self.prepared(older_than_s)]

    # -- shared steps ------------------------------------------------------------------
    async def _delete_chat(self, chat_id: str) -> int:
        """Chat document first (so nobody can open it again), then its messages."""
        await self.store.chats.delete_one({"_id": {"$eq": chat_id}})
        await self.hub.close_chat_everywhere(chat_id, CLOSE_NOT_FOUND, "chat deleted")
        result = await self.store.messages.delete_many({"chat_id": {"$eq": chat_id}})
        return int(result.deleted_count)

    async def invalidate(self, user_id: int) -> None:
        """The cache entry must be gone before a deletion counts as done here."""
        try:
            await self.cache.invalidate(user_id)
        except CacheError as e:
            raise ServiceUnavailable(f"user cache unavailable; cannot invalidate user {user_id} yet") from e

    # -- saga --------------------------------------------------------------------------
    async def purge(self, user_id: int, limit: int) -> dict[str, Any]:
        """Delete up to ``limit`` of the user's messages (whole chats once empty)."""
        chats_deleted = messages_deleted = 0
        with unavailable("chat"):
            chats = await self.store.chats_of(user_id)
            mark = f"saga-user-{user_id}"
            for chat in chats:
                if not chat.deleting:
                    await self.store.chats.update_one({"_id": {"$eq": chat.chat_id}}, {"$set": {"deleting": mark}})
                    await self.hub.close_chat_everywhere(chat.chat_id, CLOSE_DELETING, "chat is being deleted")
            budget = limit
            for chat in chats:
                if budget <= 0:
                    break
                cut = (
                    await self.store.messages.find({"chat_id": {"$eq": chat.chat_id}}, {"seq": 1})
                    .sort("seq", ASCENDING)
                    .skip(budget - 1)
                    .limit(1)
                    .to_list()
                )
                if cut:
                    result = await self.store.messages.delete_many(
                        {"chat_id": {"$eq": chat.chat_id}, "seq": {"$lte": int(cut[0]["seq"])}}
                    )
                    messages_deleted += int(result.deleted_count)
                    budget -= int(result.deleted_count)
                    continue
                messages_deleted += await self._delete_chat(chat.chat_id)
                chats_deleted += 1
                budget -= 1
            remaining = await self.store.chats_of(user_id)
        return {
            "user_id": user_id,
            "chats_deleted": chats_deleted,
            "messages_deleted": messages_deleted,
            "done": not remaining,
        }
