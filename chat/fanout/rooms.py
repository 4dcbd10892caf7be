"""A room: one chat with sockets on this instance, delivering in ``seq`` order, each seq once.

* A seq seen twice (a re-publish, a resent message, a gap fill racing the publish) is
  dropped.
* A seq that arrives ahead of the next expected one is held while the missing ones are
  read from MongoDB (pub/sub loses messages across reconnects and publishers may die
  between storing and publishing); a seq confirmed absent for the gap-skip time is
  skipped, so one lost write can never stall a chat.
* :meth:`Room.check_tail` re-reads what MongoDB holds beyond the last delivery (the hub
  calls it for a quiet room, and for every room after the pub/sub connection came back).
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from collections import deque
from typing import Protocol

from chat.fanout.stats import FanoutStats
from chat.fanout.subscriptions import CATCH_UP_PAGE, MessageReader
from chat.store import Chat, ChatMessage, StoreUnavailable
from common.tasks import backoff_delay

log = logging.getLogger("barber.chat.fanout")

RECENT_MESSAGES = 256
# A gap still open after a fill waits this long before the next read.
FILL_RETRY_S = 0.1


class RoomStore(MessageReader, Protocol):
    """What a room reads from storage (chat.store.Store implements it)."""

    async def max_seq(self, chat_id: str) -> int: ...

    async def get_chat(self, chat_id: str) -> Chat | None: ...


class Member(Protocol):
    """A socket in the room (a :class:`~chat.fanout.subscriptions.Subscription`)."""

    def offer(self, msg: ChatMessage) -> None:
        """Called in seq order for every message the room delivers."""

    def close(self, code: int, reason: str) -> None: ...


class Room:
    def __init__(self, chat: Chat, store: RoomStore, stats: FanoutStats, gap_skip_s: float) -> None:
        self.chat = chat
        self.chat_id = chat.chat_id
        self._store = store
        self._stats = stats
        self.gap_skip_s = gap_skip_s
        self.subs: set[Member] = set()
        # Highest seq delivered to this room, in order; every seq up to it was handled.
        self.delivered = 0
        # Highest seq known to exist in MongoDB (>= delivered).
        self.known_max = 0
        self.pending: dict[int, ChatMessage] = {}
        self.recent: deque[ChatMessage] = deque(maxlen=RECENT_MESSAGES)
        self.last_delivery = time.monotonic()
        self.needs_check = False
        self.closed = False
        # Why the chat takes no more messages (being deleted, deleted), once known here.
        self.refused: str | None = None
        self.ready: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        # Published while the room was opening; accepted once it knows where it stands.
        self.early: list[ChatMessage] = []
        self._filler: asyncio.Task[None] | None = None

    async def init(self) -> None:
        try:
            # The fan-out channel is subscribed for the life of the instance, so whatever
            # is stored after this read is published after it and reaches us (held in
            # `early` until we know where we stand).
            top = await self._store.max_seq(self.chat_id)
            # The caller's copy of the chat may predate a deletion mark set meanwhile.
            fresh = await self._store.get_chat(self.chat_id)
            if fresh is None:
                self.refused = "chat deleted"
            elif fresh.deleting:
                self.refused = "chat is being deleted"
        except Exception as e:  # any failure must release the joiners waiting on `ready`
            if not isinstance(e, StoreUnavailable):
                log.exception("opening room %s failed", self.chat_id)
                e = StoreUnavailable("chat unavailable")
            if not self.ready.done():
                self.ready.set_exception(e)
                self.ready.exception()
            return
        self.delivered = max(self.delivered, top)
        self.known_max = max(self.known_max, top)
        self.last_delivery = time.monotonic()
        self.ready.set_result(None)
        early, self.early = self.early, []
        for msg in early:
            self.accept(msg)

    @property
    def is_open(self) -> bool:
        """Opened without error and not closed since."""
        return not self.closed and self.ready.done() and self.ready.exception() is None

    def next_seq(self) -> int:
        return max(self.delivered, self.known_max) + 1

    def recent_after(self, seq: int) -> list[ChatMessage]:
        """The room's in-memory messages after ``seq``, if they continue from it."""
        if not self.recent or not (self.recent[0].seq <= seq + 1 <= self.recent[-1].seq):
            return []
        start = seq + 1 - self.recent[0].seq
        return list(itertools.islice(self.recent, start, None))

    def receive(self, msg: ChatMessage) -> None:
        """A message published by another instance: held until the room has opened."""
        if self.ready.done():
            self.accept(msg)
        else:
            self.early.append(msg)

    def accept(self, msg: ChatMessage) -> None:
        """Take a stored message from any source; delivers in order, each seq once."""
        if self.closed:
            return
        if msg.seq > self.known_max:
            self.known_max = msg.seq
        if msg.seq <= self.delivered:
            return
        if msg.seq == self.delivered + 1:
            self._deliver(msg)
            self._drain_pending()
        else:
            self.pending[msg.seq] = msg
            if self._filler is None or self._filler.done():
                self._filler = asyncio.create_task(self._fill())

    def _deliver(self, msg: ChatMessage) -> None:
        self.delivered = msg.seq
        self.last_delivery = time.monotonic()
        if self.recent and self.recent[-1].seq != msg.seq - 1:
            self.recent.clear()
        self.recent.append(msg)
        for sub in list(self.subs):
            sub.offer(msg)

    def _drain_pending(self) -> None:
        while self.pending:
            nxt = self.pending.pop(self.delivered + 1, None)
            if nxt is None:
                for seq in [s for s in self.pending if s <= self.delivered]:
                    del self.pending[seq]
                return
            self._deliver(nxt)

    async def _fill(self) -> None:
        """Read the seqs missing below the held messages from MongoDB."""
        missing_since: float | None = None
        attempt = 0
        while self.pending and not self.closed:
            self._drain_pending()
            if not self.pending:
                return
            try:
                found = await self._store.messages_after(
                    self.chat_id, self.delivered, CATCH_UP_PAGE, upto=min(self.pending) - 1
                )
            except StoreUnavailable:
                attempt += 1
                await asyncio.sleep(backoff_delay(attempt))
                continue
            attempt = 0
            for msg in found:
                if msg.seq > self.delivered:
                    self._stats.gap_filled += 1
                self.accept(msg)
            if not self.pending or min(self.pending) == self.delivered + 1 or found:
                missing_since = None
                continue
            now = time.monotonic()
            if missing_since is None:
                missing_since = now
            if now - missing_since >= self.gap_skip_s:
                self._skip_gap()
                missing_since = None
                continue
            await asyncio.sleep(FILL_RETRY_S)

    def _skip_gap(self) -> None:
        """Give up on the seqs below the first held message: they were never stored."""
        first_held = min(self.pending)
        log.warning(
            "chat %s: seq %d..%d absent from storage for %.1fs; skipping them",
            self.chat_id,
            self.delivered + 1,
            first_held - 1,
            self.gap_skip_s,
        )
        self._stats.gaps_skipped += first_held - 1 - self.delivered
        self.delivered = first_held - 1
        self.recent.clear()

    async def check_tail(self) -> None:
        """Deliver whatever MongoDB holds beyond what this room delivered."""
        self.needs_check = False
        while not self.closed:
            found = await self._store.messages_after(self.chat_id, self.delivered, CATCH_UP_PAGE)
            before = self.delivered
            for msg in found:
                self.accept(msg)
            self._stats.tail_recovered += max(0, self.delivered - before)
            if len(found) < CATCH_UP_PAGE:
                return

    def close(self, code: int, reason: str) -> None:
        for sub in list(self.subs):
            sub.close(code, reason)
        self.subs.clear()
