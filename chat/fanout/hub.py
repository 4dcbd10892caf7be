"""The hub: this instance's rooms, wired to the bus and the writer.

It is the only part that knows all the others: the bus hands it what other instances
published (:class:`~chat.fanout.bus.BusListener`), the writer gets the bus's ``publish``
and the hub's ``close_chat``, the rooms and subscriptions get the store and the counters.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Coroutine
from dataclasses import dataclass
from typing import Any

from chat.chats import CLOSE_DELETING, CLOSE_NOT_FOUND
from chat.fanout.bus import Bus
from chat.fanout.rooms import Room
from chat.fanout.stats import FanoutStats
from chat.fanout.subscriptions import Delivery, Subscription, Transport
from chat.fanout.writer import Writer
from chat.store import Chat, ChatMessage, Store, StoreUnavailable, iso_now, message_id
from chat.users import User
from common.errors import Conflict
from common.tasks import cancel_and_wait

log = logging.getLogger("barber.chat.fanout")

CLOSE_GOING_AWAY = 1001
LAG_PROBE_S = 0.1


@dataclass
class HubConfig:
    replay_last: int = 50
    send_timeout_s: float = 10.0
    tail_check_s: float = 5.0
    gap_skip_s: float = 3.0
    write_batch_max: int = 500
    max_buffer_bytes: int = 1024 * 1024


class Hub:
    def __init__(self, store: Store, redis_url: str, config: HubConfig) -> None:
        self.store = store
        self.config = config
        self.stats = FanoutStats()
        self.rooms: dict[str, Room] = {}
        self.bus = Bus(redis_url, self, self.stats)
        self.writer = Writer(store, self.stats, self.bus.publish, self.close_chat, config.write_batch_max)
        self._delivery = Delivery(store, self.stats, config.max_buffer_bytes, config.send_timeout_s)
        self._tail_task: asyncio.Task[None] | None = None
        self._tail_wake = asyncio.Event()
        self._background: set[asyncio.Future[Any]] = set()

    async def start(self) -> None:
        await self.bus.start()
        self.writer.start()
        self._tail_task = asyncio.create_task(self._tail_loop())
        self.spawn(self._lag_loop())

    async def _lag_loop(self) -> None:
        while True:
            before = time.monotonic()
            await asyncio.sleep(LAG_PROBE_S)
            lag = (time.monotonic() - before - LAG_PROBE_S) * 1000
            if lag > self.stats.loop_lag_max_ms:
                self.stats.loop_lag_max_ms = lag

    async def stop(self) -> None:
        for room in list(self.rooms.values()):
            room.close(CLOSE_GOING_AWAY, "chat instance shutting down; reconnect")
            room.closed = True
        self.rooms.clear()
        await cancel_and_wait(self._tail_task)
        await self.writer.stop()
        await self.bus.stop()
        await cancel_and_wait(*self._background)

    def spawn(self, coro: Coroutine[Any, Any, Any]) -> None:
        """Run ``coro`` in the background, keeping a reference until it finishes."""
        task = asyncio.ensure_future(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    @property
    def socket_count(self) -> int:
        return sum(len(r.subs) for r in self.rooms.values())

    # -- sockets joining and leaving ------------------------------------------------------
    async def join(self, chat: Chat, transport: Transport, user: User, since: int | None) -> Subscription[Room]:
        """Attach a socket; it receives every message after ``since`` (or the last
        ``CHAT_REPLAY_LAST``), then live ones. Raises StoreUnavailable."""
        room = self.rooms.get(chat.chat_id)
        if room is None:
            room = Room(chat, self.store, self.stats, self.config.gap_skip_s)
            self.rooms[chat.chat_id] = room
            self.spawn(room.init())
        try:
            await asyncio.shield(room.ready)
        except StoreUnavailable:
            if self.rooms.get(chat.chat_id) is room:
                del self.rooms[chat.chat_id]
            raise
        if room.closed:
            # Emptied and removed while we waited: start over with a fresh room.
            return await self.join(chat, transport, user, since)
        cursor = since if since is not None else max(0, room.delivered - self.config.replay_last)
        sub = Subscription(room, transport, user, cursor, self._delivery)
        room.subs.add(sub)
        sub.start_catch_up()
        return sub

    async def leave(self, sub: Subscription[Room]) -> None:
        sub.stop()
        room = sub.room
        room.subs.discard(sub)
        if not room.subs and not room.closed and self.rooms.get(room.chat_id) is room:
            room.closed = True
            del self.rooms[room.chat_id]

    def close_chat(self, chat_id: str, code: int, reason: str) -> int:
        """Close every local socket of a chat (e.g. 4409 while it is being deleted)."""
        room = self.rooms.get(chat_id)
        if room is None:
            return 0
        n = len(room.subs)
        room.refused = reason
        room.close(code, reason)
        room.closed = True
        del self.rooms[chat_id]
        return n

    async def close_chat_everywhere(self, chat_id: str, code: int, reason: str) -> None:
        self.close_chat(chat_id, code, reason)
        await self.bus.broadcast({"action": "close_chat", "chat_id": chat_id, "code": code, "reason": reason})

    # -- messages -----------------------------------------------------------------------
    async def send(self, sub: Subscription[Room], text: str, client_id: str | None) -> ChatMessage:
        """Store a message from ``sub``'s user and deliver it. Raises StoreUnavailable,
        Conflict (chat being deleted)."""
        room = sub.room
        if room.chat.deleting or room.refused:
            raise Conflict(room.refused or "chat is being deleted")
        now = time.time()
        doc: dict[str, Any] = {
            "_id": message_id(room.chat_id, sub.user.id, client_id),
            "chat_id": room.chat_id,
            "sender": sub.user.public(),
            "message": text,
            "sent_at": iso_now(now),
            "created_at": now,
        }
        if client_id is not None:
            doc["client_id"] = client_id
        return await self.writer.submit(room, doc)

    # -- what the bus hands on (BusListener) ----------------------------------------------
    def on_published(self, msg: ChatMessage) -> None:
        self.stats.received += 1
        room = self.rooms.get(msg.chat_id)
        if room is not None:
            room.receive(msg)

    def on_control(self, control: dict[str, Any]) -> None:
        if control.get("action") == "close_chat":
            self.close_chat(str(control["chat_id"]), int(control["code"]), str(control["reason"]))

    def on_resubscribed(self) -> None:
        """The pub/sub connection came back: every room re-reads its tail, and its chat
        (a deletion's close broadcast may have been missed meanwhile)."""
        for room in self.rooms.values():
            self.stats.resyncs += 1
            room.needs_check = True
        self._tail_wake.set()
        self.spawn(self._recheck_chats())

    async def _recheck_chats(self) -> None:
        for chat_id in list(self.rooms):
            try:
                chat = await self.store.get_chat(chat_id)
            except StoreUnavailable:
                return
            if chat is None:
                self.close_chat(chat_id, CLOSE_NOT_FOUND, "chat deleted")
            elif chat.deleting:
                self.close_chat(chat_id, CLOSE_DELETING, "chat is being deleted")

    # -- tail checks: what pub/sub did not bring ------------------------------------------
    async def _tail_loop(self) -> None:
        interval = self.config.tail_check_s
        while True:
            try:
                await asyncio.wait_for(self._tail_wake.wait(), min(1.0, interval / 2))
            except TimeoutError:
                pass
            self._tail_wake.clear()
            await self._check_tails(interval)

    async def _check_tails(self, interval: float) -> None:
        """Re-read the tail of each room flagged, or quiet for ``interval``; stops at the
        first storage failure (the rest wait for the next round)."""
        now = time.monotonic()
        for room in list(self.rooms.values()):
            if not room.is_open:
                continue
            if not room.needs_check and now - room.last_delivery < interval:
                continue
            try:
                await room.check_tail()
            except StoreUnavailable as e:
                log.warning("tail check of chat %s failed: %s", room.chat_id, e)
                room.needs_check = True
                return
            room.last_delivery = now
