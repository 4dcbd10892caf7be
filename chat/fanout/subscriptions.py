"""One socket in one room: its own delivery cursor, catch-up from ``since``, then live.

A socket first catches up (from the room's recent messages, else MongoDB, paced by how
fast the client reads), then goes live. A live socket whose unsent backlog reaches the
buffer limit stops taking live frames and catches up the same way, so a slow client
costs bounded memory; one that takes nothing for the send timeout is disconnected (4408).
"""

from __future__ import annotations

import asyncio
import itertools
from dataclasses import dataclass
from typing import Generic, Protocol, TypeVar

from chat.fanout.stats import FanoutStats
from chat.store import ChatMessage, StoreUnavailable
from chat.users import User
from common.tasks import backoff_delay

CATCH_UP_PAGE = 200
# Close codes (application range 4000-4999; the admission ones are in chat.chats).
CLOSE_TOO_SLOW = 4408
CLOSE_UNAVAILABLE = 1013  # "try again later"
# A catch-up gives up (the client reconnects with since) after this many failed reads.
CATCH_UP_ATTEMPTS = 5


class Transport(Protocol):
    """What a subscription needs from a socket (the WebSocket handler implements it)."""

    def send_frame(self, text: str, nbytes: int) -> None:
        """Queue one text frame; a transport over its buffer limit closes itself."""

    @property
    def buffered_bytes(self) -> int:
        """Bytes queued but not yet taken by the kernel."""

    async def drain(self, timeout: float) -> bool:
        """Wait until the backlog is down to half the buffer limit; False on timeout
        or close."""

    def close_with(self, code: int, reason: str) -> None: ...

    @property
    def is_closed(self) -> bool: ...


class Feed(Protocol):
    """What a subscription reads from its room."""

    @property
    def chat_id(self) -> str: ...

    @property
    def delivered(self) -> int:
        """Highest seq the room delivered; every seq up to it was handled."""

    def recent_after(self, seq: int) -> list[ChatMessage]:
        """The room's in-memory messages after ``seq``, if they continue from it."""


class MessageReader(Protocol):
    """Stored messages (chat.store.Store implements it)."""

    async def messages_after(
        self, chat_id: str, after: int, limit: int, upto: int | None = None
    ) -> list[ChatMessage]: ...


@dataclass(frozen=True)
class Delivery:
    """What every subscription of one hub shares."""

    reader: MessageReader
    stats: FanoutStats
    max_buffer_bytes: int
    send_timeout_s: float


F = TypeVar("F", bound=Feed)


class Subscription(Generic[F]):
    """One socket in one room, with its own delivery cursor."""

    _ids = itertools.count(1)

    def __init__(self, room: F, transport: Transport, user: User, cursor: int, delivery: Delivery) -> None:
        self.id = next(self._ids)
        self.room = room
        self.transport = transport
        self.user = user
        self.cursor = cursor
        self.live = False
        self.closed = False
        self._delivery = delivery
        self._task: asyncio.Task[None] | None = None

    def start_catch_up(self) -> None:
        self.live = False
        if self._task is None or self._task.done():
            self._task = asyncio.create_task(self._catch_up())

    def offer(self, msg: ChatMessage) -> None:
        """Called by the room, in seq order, for every message it delivers."""
        if not self.live or self.closed or msg.seq <= self.cursor:
            return
        if msg.seq == self.cursor + 1 and not self._over_limit(msg):
            self._send(msg)
        else:
            # Behind, or the client's backlog is full: continue from the room's recent
            # messages / MongoDB at the client's pace (and drop it if it takes nothing).
            self.start_catch_up()

    def _over_limit(self, msg: ChatMessage) -> bool:
        return self.transport.buffered_bytes + msg.frame_bytes > self._delivery.max_buffer_bytes

    def _send(self, msg: ChatMessage) -> None:
        self.cursor = msg.seq
        if self.transport.is_closed:
            self.closed = True
            return
        self.transport.send_frame(msg.frame, msg.frame_bytes)
        self._delivery.stats.delivered += 1

    async def _catch_up(self) -> None:
        attempt = 0
        while not self.closed:
            target = self.room.delivered
            if self.cursor >= target:
                # Nothing awaits between this check and going live, so no delivery
                # can slip in between.
                self.live = True
                return
            batch = self.room.recent_after(self.cursor)
            if not batch:
                try:
                    batch = await self._delivery.reader.messages_after(
                        self.room.chat_id, self.cursor, CATCH_UP_PAGE, upto=target
                    )
                except StoreUnavailable:
                    attempt += 1
                    if attempt > CATCH_UP_ATTEMPTS:
                        self.transport.close_with(CLOSE_UNAVAILABLE, "storage unavailable; reconnect with since")
                        self.closed = True
                        return
                    await asyncio.sleep(backoff_delay(attempt))
                    continue
                attempt = 0
                if not batch:
                    # Only skipped (never stored) seqs remain below the target.
                    self.cursor = target
                    continue
            if not await self._replay(batch) or self.transport.is_closed:
                self.closed = True
                return

    async def _replay(self, batch: list[ChatMessage]) -> bool:
        """Send ``batch`` at the client's pace; False once the subscription is closed."""
        for msg in batch:
            if msg.seq <= self.cursor:
                continue
            # Within the same buffer bound as live delivery; a client that takes nothing
            # for the send timeout is not reading at all.
            if self._over_limit(msg) and not await self._wait_for_client():
                return False
            if self.closed or msg.seq <= self.cursor:
                continue
            self._send(msg)
        return not self.closed

    async def _wait_for_client(self) -> bool:
        if await self.transport.drain(self._delivery.send_timeout_s):
            return True
        if not self.transport.is_closed:
            self._delivery.stats.slow_disconnects += 1
            self.transport.close_with(CLOSE_TOO_SLOW, "client is not reading")
        self.closed = True
        return False

    def stop(self) -> None:
        self.closed = True
        if self._task is not None and not self._task.done():
            self._task.cancel()

    def close(self, code: int, reason: str) -> None:
        """Stop and close the socket (the room is closing)."""
        self.stop()
        self.transport.close_with(code, reason)
