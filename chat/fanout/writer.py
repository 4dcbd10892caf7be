"""The write path: messages stored in batches, each given its chat's next ``seq``.

Seqs are allocated without a counter (see chat.store): a message gets ``seq = the room's
last known + 1`` and the unique (chat_id, seq) index decides. A message that loses
learns the chat's real end and tries again; one whose ``_id`` exists was stored before
(a retry after a lost reply, or a resend with the same client_id) and is answered with
the stored copy.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

from chat.chats import CLOSE_NOT_FOUND
from chat.fanout.stats import FanoutStats
from chat.store import ChatMessage, InsertOutcome, StoreUnavailable
from common.errors import BadRequest, Conflict
from common.tasks import backoff_delay, cancel_and_wait

log = logging.getLogger("barber.chat.fanout")

SLOW_WRITE_S = 0.25
# A message that keeps losing its seq to other writers is refused after this many tries.
MAX_SEQ_ATTEMPTS = 50
ORPHAN_REMOVAL_ATTEMPTS = 5


class WriteStore(Protocol):
    """What the writer needs from storage (chat.store.Store implements it)."""

    async def insert_messages(self, docs: list[dict[str, Any]]) -> list[InsertOutcome]: ...

    async def existing_chats(self, chat_ids: set[str]) -> set[str]: ...

    async def delete_messages(self, message_ids: list[str]) -> None: ...

    async def message_by_id(self, mid: str) -> ChatMessage | None: ...

    async def max_seq(self, chat_id: str) -> int: ...


class Target(Protocol):
    """The chat a message is written to (a :class:`~chat.fanout.rooms.Room`)."""

    chat_id: str
    # Highest seq known to exist in storage.
    known_max: int
    # Why the chat takes no more messages, once known (None: it takes them).
    refused: str | None

    def next_seq(self) -> int: ...

    def accept(self, msg: ChatMessage) -> None:
        """Deliver a stored message to the chat's local sockets."""


Publish = Callable[[list[ChatMessage]], None]
CloseChat = Callable[[str, int, str], object]


@dataclass
class _PendingWrite:
    room: Target
    doc: dict[str, Any]
    future: asyncio.Future[ChatMessage]
    deadline: float
    attempts: int = 0
    seq_assigned: bool = False


class Writer:
    """Stores messages in batches, one message per chat per batch.

    Batching across chats turns many small inserts into one round trip (the batch grows
    by itself while the previous one is in flight). One message per chat per batch keeps
    each chat's messages in submission order: a message only gets a seq once the one
    before it from this instance is stored.

    Stored messages go to ``publish`` (the bus); ``close_chat`` closes the local sockets
    of a chat found deleted after its messages were written.
    """

    def __init__(
        self,
        store: WriteStore,
        stats: FanoutStats,
        publish: Publish,
        close_chat: CloseChat,
        batch_max: int,
        write_timeout_s: float = 10.0,
    ) -> None:
        self._store = store
        self._stats = stats
        self._publish = publish
        self._close_chat = close_chat
        self.batch_max = batch_max
        self.write_timeout_s = write_timeout_s
        self._queues: dict[str, deque[_PendingWrite]] = {}
        self._ready: deque[str] = deque()
        self._inflight: set[str] = set()
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._run())

    async def stop(self) -> None:
        await cancel_and_wait(self._task)
        for queue in self._queues.values():
            for p in queue:
                if not p.future.done():
                    p.future.set_exception(StoreUnavailable("chat instance shutting down; resend"))
                    p.future.exception()

    @property
    def queued(self) -> int:
        return sum(len(q) for q in self._queues.values())

    async def submit(self, room: Target, doc: dict[str, Any]) -> ChatMessage:
        fut: asyncio.Future[ChatMessage] = asyncio.get_running_loop().create_future()
        p = _PendingWrite(room, doc, fut, time.monotonic() + self.write_timeout_s)
        queue = self._queues.setdefault(room.chat_id, deque())
        queue.append(p)
        if len(queue) == 1 and room.chat_id not in self._inflight:
            self._ready.append(room.chat_id)
        self._wake.set()
        return await fut

    # -- the loop: one batch at a time, one message per chat per batch ------------------
    async def _run(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            while self._ready:
                batch = self._take_batch()
                try:
                    await self._write(batch)
                except asyncio.CancelledError:
                    raise
                except Exception:  # a bug must not kill the writer: fail this batch only
                    log.exception("message batch failed")
                    for p in batch:
                        self._finish(p, error=StoreUnavailable("message not stored; resend"))
                self._release(batch)

    def _take_batch(self) -> list[_PendingWrite]:
        """The first waiting message of up to ``batch_max`` ready chats."""
        batch: list[_PendingWrite] = []
        while self._ready and len(batch) < self.batch_max:
            chat_id = self._ready.popleft()
            queue = self._queues.get(chat_id)
            if not queue:
                self._queues.pop(chat_id, None)
                continue
            self._inflight.add(chat_id)
            batch.append(queue[0])
        return batch

    def _release(self, batch: list[_PendingWrite]) -> None:
        """The batch's chats are ready again if they have more (or the same, unfinished)
        messages waiting."""
        for p in batch:
            chat_id = p.room.chat_id
            self._inflight.discard(chat_id)
            queue = self._queues.get(chat_id)
            if queue:
                self._ready.append(chat_id)
            else:
                self._queues.pop(chat_id, None)

    def _finish(self, p: _PendingWrite, msg: ChatMessage | None = None, error: Exception | None = None) -> None:
        queue = self._queues.get(p.room.chat_id)
        if queue and queue[0] is p:
            queue.popleft()
        if p.future.done():
            return
        if error is not None:
            self._stats.store_failures += 1
            p.future.set_exception(error)
        else:
            p.future.set_result(msg)  # type: ignore[arg-type]

    # -- one batch ------------------------------------------------------------------------
    async def _write(self, batch: list[_PendingWrite]) -> None:
        batch = self._refuse_closed(batch)
        if not batch:
            return
        self._assign_seqs(batch)
        outcomes = await self._insert(batch)
        if outcomes is None:
            return
        stored = await self._settle(batch, outcomes)
        if stored:
            self._publish(stored)

    def _refuse_closed(self, batch: list[_PendingWrite]) -> list[_PendingWrite]:
        """A chat closed for deletion while its messages waited here takes none of them."""
        for p in batch:
            if p.room.refused:
                self._finish(p, error=Conflict(p.room.refused or "chat is being deleted"))
        return [p for p in batch if not p.room.refused]

    @staticmethod
    def _assign_seqs(batch: list[_PendingWrite]) -> None:
        for p in batch:
            if not p.seq_assigned:
                p.doc["seq"] = p.room.next_seq()
                p.seq_assigned = True
            p.attempts += 1

    async def _insert(self, batch: list[_PendingWrite]) -> list[InsertOutcome] | None:
        """Each message's outcome; None when storage did not answer (retried later)."""
        started = time.monotonic()
        try:
            outcomes = await self._store.insert_messages([p.doc for p in batch])
        except StoreUnavailable as e:
            # Unknown whether the batch landed: keep each message's _id and seq and retry;
            # one that did land reports a duplicate _id next time.
            now = time.monotonic()
            for p in batch:
                if now >= p.deadline:
                    self._finish(p, error=StoreUnavailable("message not stored (storage unavailable); resend it"))
            log.warning("storing %d message(s) failed: %s; retrying", len(batch), e)
            await asyncio.sleep(backoff_delay(batch[0].attempts))
            return None
        took = time.monotonic() - started
        self._stats.write_batches += 1
        self._stats.write_seconds += took
        if took > SLOW_WRITE_S:
            log.warning("storing %d message(s) took %.0f ms", len(batch), took * 1000)
        return outcomes

    async def _settle(self, batch: list[_PendingWrite], outcomes: list[InsertOutcome]) -> list[ChatMessage]:
        """Answer each sender and deliver locally; returns what is to be published."""
        landed = [p for p, out in zip(batch, outcomes) if out.ok]
        deleted = await self._chats_deleted_meanwhile({p.room.chat_id for p in landed})
        if deleted:
            await self._remove_orphans([p for p in landed if p.room.chat_id in deleted], deleted)
        stored: list[ChatMessage] = []
        for p, out in zip(batch, outcomes):
            if out.ok and p.room.chat_id in deleted:
                self._finish(p, error=Conflict("chat deleted"))
            elif out.ok:
                self._stats.stored += 1
                stored.append(self._stored(p, ChatMessage.from_doc(p.doc)))
            elif out.duplicate:
                await self._resolve_duplicate(p, stored)
            elif out.invalid:
                # Its seq was never taken (seqs follow what is stored): the next message
                # of the chat gets it.
                self._finish(p, error=BadRequest(f"message {out.error}"))
            else:
                self._finish(p, error=StoreUnavailable(f"message not stored: {out.error}"))
        return stored

    def _stored(self, p: _PendingWrite, msg: ChatMessage) -> ChatMessage:
        """``msg`` is in storage: answer the sender, deliver it here."""
        p.room.known_max = max(p.room.known_max, msg.seq)
        self._finish(p, msg)
        p.room.accept(msg)
        return msg

    async def _chats_deleted_meanwhile(self, chat_ids: set[str]) -> set[str]:
        """Chats deleted while their messages were being written.

        This instance may not have heard that a chat was marked (the broadcast rides on
        pub/sub), so a write can land after the deletion swept the chat's messages. A
        message whose insert is visible before this read sees its chat either still
        present (then the deletion's final sweep, which comes after the chat's removal,
        takes it) or gone (then it is removed here): either way nothing is left behind.
        """
        if not chat_ids:
            return set()
        try:
            return chat_ids - await self._store.existing_chats(chat_ids)
        except StoreUnavailable as e:
            log.warning("could not re-check %d chat(s) after writing: %s", len(chat_ids), e)
            return set()

    async def _remove_orphans(self, writes: list[_PendingWrite], chat_ids: set[str]) -> None:
        """Remove what was written to deleted chats, then close their sockets (4404), so
        that a sender who sees the close knows nothing of theirs was left behind."""
        ids = [p.doc["_id"] for p in writes]
        for attempt in range(1, ORPHAN_REMOVAL_ATTEMPTS + 1):
            try:
                await self._store.delete_messages(ids)
                log.warning("removed %d message(s) written to deleted chat(s) %s", len(ids), sorted(chat_ids))
                break
            except StoreUnavailable as e:
                log.warning("removing %d message(s) of deleted chats failed (%s); retrying", len(ids), e)
                await asyncio.sleep(backoff_delay(attempt))
        else:
            log.error("could not remove %d message(s) of deleted chat(s) %s", len(ids), sorted(chat_ids))
        for chat_id in chat_ids:
            self._close_chat(chat_id, CLOSE_NOT_FOUND, "chat deleted")

    async def _resolve_duplicate(self, p: _PendingWrite, stored: list[ChatMessage]) -> None:
        try:
            existing = await self._store.message_by_id(p.doc["_id"])
            if existing is None:
                # Another writer took this seq: learn the chat's real end, try again.
                top = await self._store.max_seq(p.room.chat_id)
                p.room.known_max = max(p.room.known_max, top)
                p.seq_assigned = False
                if p.attempts > MAX_SEQ_ATTEMPTS:
                    self._finish(p, error=StoreUnavailable("chat too busy; resend"))
                return
        except StoreUnavailable:
            return  # retried with the same seq next round
        # Stored before (a retry after a lost reply, or the client resent it with the same
        # client_id): answer with the stored message and make sure everyone has it.
        self._stats.deduplicated += 1
        stored.append(self._stored(p, existing))
