"""MongoDB storage for chats and messages.

Collections (database ``CHAT_MONGO_DB``):
  chats     {_id, customer_id, employee_id, created_at, deleting}
            unique (customer_id, employee_id): concurrent starts of one pair make one chat.
            ``deleting`` is None, or the id of the deletion transaction that holds the chat
            (sockets are closed with 4409 and new messages refused while it is set).
  messages  {_id, chat_id, seq, sender: {id, first_name, last_name}, message, sent_at,
             created_at, client_id?}
            unique (chat_id, seq): one message per seq, whoever writes it.

Sequence numbers are allocated without a counter: a writer inserts ``seq = last known + 1``
and the unique index decides; a writer that loses re-reads the chat's maximum and tries
again. A seq is only ever tried once the one before it is known to exist, so a chat's
seqs have no gaps even if a writer dies between allocating and inserting.

The embedded server (nx-27017, SQLite behind) uses an index only for plain ``{"$eq": v}``
and range conditions; a bare ``{"field": v}`` is translated with an array-membership
clause that scans the whole table, so every equality here is spelled with ``$eq``.
"""

from __future__ import annotations

import itertools
import json
import logging
import time
import uuid
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import bson
from bson.errors import BSONError
from pymongo import ASCENDING, DESCENDING, AsyncMongoClient
from pymongo.errors import BulkWriteError, DuplicateKeyError, PyMongoError

from common.errors import DependencyUnavailable, translate_errors

log = logging.getLogger("barber.chat.store")

DUPLICATE_KEY = 11000


class StoreUnavailable(DependencyUnavailable):
    """MongoDB did not answer or refused the operation."""

    dependency = "mongodb"


def unavailable(what: str) -> AbstractContextManager[None]:
    """Driver errors in the block become ``StoreUnavailable("<what> storage unavailable")``."""
    return translate_errors(PyMongoError, lambda _: StoreUnavailable(f"{what} storage unavailable"))


@dataclass(frozen=True, slots=True)
class Chat:
    chat_id: str
    customer_id: int
    employee_id: int
    created_at: float
    deleting: str | None = None

    def is_participant(self, user_id: int) -> bool:
        return user_id in (self.customer_id, self.employee_id)

    def other(self, user_id: int) -> int:
        return self.employee_id if user_id == self.customer_id else self.customer_id

    @classmethod
    def from_doc(cls, doc: dict[str, Any]) -> Chat:
        return cls(
            chat_id=str(doc["_id"]),
            customer_id=int(doc["customer_id"]),
            employee_id=int(doc["employee_id"]),
            created_at=float(doc.get("created_at") or 0.0),
            deleting=doc.get("deleting"),
        )


@dataclass(slots=True)
class ChatMessage:
    """A stored message. ``frame`` is its socket frame, encoded once for every receiver."""

    chat_id: str
    seq: int
    public: dict[str, Any]
    created_at: float
    _frame: str | None = field(default=None, repr=False)
    _frame_bytes: int = 0

    @classmethod
    def from_doc(cls, doc: dict[str, Any]) -> ChatMessage:
        public: dict[str, Any] = {
            "type": "chat_message",
            "chat_id": doc["chat_id"],
            "seq": int(doc["seq"]),
            "message": doc["message"],
            "sender": doc["sender"],
            "sent_at": doc["sent_at"],
        }
        if doc.get("client_id") is not None:
            public["client_id"] = doc["client_id"]
        return cls(doc["chat_id"], int(doc["seq"]), public, float(doc.get("created_at") or 0.0))

    @classmethod
    def from_public(cls, public: dict[str, Any], created_at: float = 0.0, frame: str | None = None) -> ChatMessage:
        msg = cls(str(public["chat_id"]), int(public["seq"]), public, created_at)
        if frame is not None:
            msg._frame = frame
            msg._frame_bytes = len(frame.encode())
        return msg

    @property
    def frame(self) -> str:
        if self._frame is None:
            self._frame = json.dumps(self.public, separators=(",", ":"), ensure_ascii=False)
            self._frame_bytes = len(self._frame.encode())
        return self._frame

    @property
    def frame_bytes(self) -> int:
        self.frame  # noqa: B018 -- computes the size along with the frame
        return self._frame_bytes


def new_chat_id() -> str:
    return uuid.uuid4().hex


_ID_PREFIX = uuid.uuid4().hex[:16]
_id_counter = itertools.count(1)


def message_id(chat_id: str, sender_id: int, client_id: str | None) -> str:
    """The message's ``_id``: derived from the client's id when it gives one, so a resend
    after a reconnect finds the stored message instead of storing it twice; otherwise
    unique by a per-process random prefix and a counter (cheaper than a uuid each)."""
    if client_id is None:
        return f"{_ID_PREFIX}{next(_id_counter):x}"
    return f"{chat_id}:{sender_id}:{client_id}"


def iso_now(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


@dataclass(slots=True)
class InsertOutcome:
    """What happened to one document of a batch insert."""

    ok: bool = False
    # A unique index refused it: either its _id exists (stored before: a retry or a
    # resend) or its (chat_id, seq) slot was taken by another writer. The caller tells
    # the two apart by looking the _id up, rather than by parsing server messages.
    duplicate: bool = False
    error: str | None = None
    # The document itself cannot be stored (not encodable as BSON): retrying cannot help.
    invalid: bool = False


class Store:
    def __init__(self, client: AsyncMongoClient, db_name: str) -> None:
        self.client = client
        self.db = client[db_name]
        self.chats = self.db["chats"]
        self.messages = self.db["messages"]

    @classmethod
    def connect(cls, url: str, db_name: str) -> Store:
        client: AsyncMongoClient = AsyncMongoClient(
            url, serverSelectionTimeoutMS=3000, connectTimeoutMS=3000, socketTimeoutMS=10000, tz_aware=False
        )
        return cls(client, db_name)

    async def close(self) -> None:
        await self.client.close()

    async def ensure_indexes(self) -> None:
        with translate_errors(PyMongoError, lambda e: StoreUnavailable(f"cannot create indexes: {e}")):
            await self.messages.create_index([("chat_id", ASCENDING), ("seq", ASCENDING)], unique=True)
            await self.chats.create_index([("customer_id", ASCENDING), ("employee_id", ASCENDING)], unique=True)
            await self.chats.create_index([("employee_id", ASCENDING)])
            # Recovery looks for chats left marked by a deletion (a range on the mark).
            await self.chats.create_index([("deleting", ASCENDING)])

    async def ping(self) -> bool:
        try:
            await self.db.command("ping")
            return True
        except PyMongoError:
            return False

    # -- chats -----------------------------------------------------------------------
    async def get_chat(self, chat_id: str) -> Chat | None:
        with unavailable("chat"):
            doc = await self.chats.find_one({"_id": {"$eq": chat_id}})
        return Chat.from_doc(doc) if doc else None

    async def start_chat(self, customer_id: int, employee_id: int) -> tuple[Chat, bool]:
        """The pair's chat, created if missing; ``True`` when this call created it.

        Insert first and let the unique pair index arbitrate, so two concurrent starts
        cannot both create one."""
        now = time.time()
        doc = {
            "_id": new_chat_id(),
            "customer_id": customer_id,
            "employee_id": employee_id,
            "created_at": now,
            "deleting": None,
        }
        with unavailable("chat"):
            try:
                await self.chats.insert_one(doc)
                return Chat.from_doc(doc), True
            except DuplicateKeyError:
                pass
        with unavailable("chat"):
            existing = await self.chats.find_one(
                {"customer_id": {"$eq": customer_id}, "employee_id": {"$eq": employee_id}}
            )
        if existing is None:  # the winner's document vanished (deleted meanwhile)
            raise StoreUnavailable("chat was removed while being started; try again")
        return Chat.from_doc(existing), False

    async def chats_of(self, user_id: int) -> list[Chat]:
        with unavailable("chat"):
            as_customer = await self.chats.find({"customer_id": {"$eq": user_id}}).to_list()
            as_employee = await self.chats.find({"employee_id": {"$eq": user_id}}).to_list()
        seen: dict[str, Chat] = {}
        for doc in as_customer + as_employee:
            chat = Chat.from_doc(doc)
            seen[chat.chat_id] = chat
        return list(seen.values())

    # -- messages --------------------------------------------------------------------
    async def max_seq(self, chat_id: str) -> int:
        with unavailable("message"):
            docs = (
                await self.messages.find({"chat_id": {"$eq": chat_id}}, {"seq": 1})
                .sort("seq", DESCENDING)
                .limit(1)
                .to_list()
            )
        return int(docs[0]["seq"]) if docs else 0

    async def last_message(self, chat_id: str) -> ChatMessage | None:
        with unavailable("message"):
            docs = await self.messages.find({"chat_id": {"$eq": chat_id}}).sort("seq", DESCENDING).limit(1).to_list()
        return ChatMessage.from_doc(docs[0]) if docs else None

    async def messages_after(self, chat_id: str, after: int, limit: int, upto: int | None = None) -> list[ChatMessage]:
        """Messages with ``after < seq (<= upto)``, oldest first."""
        cond: dict[str, int] = {"$gt": after}
        if upto is not None:
            cond["$lte"] = upto
        with unavailable("message"):
            docs = (
                await self.messages.find({"chat_id": {"$eq": chat_id}, "seq": cond})
                .sort("seq", ASCENDING)
                .limit(limit)
                .to_list()
            )
        return [ChatMessage.from_doc(d) for d in docs]

    async def messages_before(self, chat_id: str, before: int | None, limit: int) -> list[ChatMessage]:
        """Messages with ``seq < before`` (all when None), newest first."""
        query: dict[str, Any] = {"chat_id": {"$eq": chat_id}}
        if before is not None:
            query["seq"] = {"$lt": before}
        with unavailable("message"):
            docs = await self.messages.find(query).sort("seq", DESCENDING).limit(limit).to_list()
        return [ChatMessage.from_doc(d) for d in docs]

    async def message_by_id(self, mid: str) -> ChatMessage | None:
        with unavailable("message"):
            doc = await self.messages.find_one({"_id": {"$eq": mid}})
        return ChatMessage.from_doc(doc) if doc else None

    async def existing_chats(self, chat_ids: set[str]) -> set[str]:
        """Which of ``chat_ids`` still exist (one indexed query)."""
        with unavailable("chat"):
            docs = await self.chats.find({"_id": {"$in": sorted(chat_ids)}}, {"_id": 1}).to_list()
        return {str(d["_id"]) for d in docs}

    async def delete_messages(self, message_ids: list[str]) -> None:
        with unavailable("message"):
            await self.messages.delete_many({"_id": {"$in": message_ids}})

    async def insert_messages(self, docs: list[dict[str, Any]]) -> list[InsertOutcome]:
        """Insert a batch (unordered); one outcome per document, in order.

        A connection failure raises :class:`StoreUnavailable`: the caller retries with the
        same ``_id`` and ``seq``, and a document that did land then reports ``duplicate``.
        A document that cannot be encoded fails alone (``invalid``): the rest are written,
        so one bad message never fails other people's messages of the same batch.
        """
        outcomes = [InsertOutcome(ok=True) for _ in docs]
        # Checked one by one before sending: the driver encodes the batch as it sends it,
        # so one bad document would fail the whole call part-way.
        sendable: list[int] = []
        for i, doc in enumerate(docs):
            try:
                bson.encode(doc)
            except (BSONError, UnicodeError, ValueError, OverflowError, TypeError) as e:
                outcomes[i] = InsertOutcome(invalid=True, error=f"cannot be stored: {type(e).__name__}")
                continue
            sendable.append(i)
        if not sendable:
            return outcomes
        with unavailable("message"):
            try:
                await self.messages.insert_many([docs[i] for i in sendable], ordered=False)
            except BulkWriteError as e:
                for err in e.details.get("writeErrors", []):
                    i = sendable[int(err["index"])]
                    out = outcomes[i] = InsertOutcome()
                    if err.get("code") == DUPLICATE_KEY:
                        out.duplicate = True
                    else:
                        out.error = str(err.get("errmsg", "write error"))
        return outcomes
