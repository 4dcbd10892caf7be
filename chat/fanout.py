"""Real-time fan-out: store first, then publish; the database is the source of truth.

One :class:`Room` per chat that has sockets on this instance. A message is stored in
MongoDB (by the :class:`Writer`, which gives it the chat's next ``seq``), delivered to
this instance's sockets at once, and published on Redis (:class:`Bus`) so the other
instances deliver it to theirs. Every room delivers in ``seq`` order, each seq once:

* a seq seen twice (a re-publish, a resent message, a gap fill racing the publish) is
  dropped;
* a seq that arrives ahead of the next expected one is held while the missing ones are
  read from MongoDB (pub/sub loses messages across reconnects and publishers may die
  between storing and publishing); a seq confirmed absent for ``CHAT_GAP_SKIP_S`` is
  skipped, so one lost write can never stall a chat;
* a room with no delivery for ``CHAT_TAIL_CHECK_S`` (and every room after the pub/sub
  connection came back) re-reads its tail from MongoDB, which delivers a message whose
  publisher died, or whose publish is still waiting for Redis, without waiting for a
  later message to reveal the gap.

Each socket (:class:`Subscription`) keeps its own cursor: it first catches up from
``since`` (from the room's recent messages, else MongoDB, paced by how fast the client
reads), then goes live. A live socket whose unsent backlog reaches
``CHAT_WS_MAX_BUFFER_BYTES`` stops taking live frames and catches up the same way, so
a slow client costs bounded memory; one that takes nothing for ``CHAT_WS_SEND_TIMEOUT_S``
is disconnected (4408).
"""

from __future__ import annotations

import asyncio
import itertools
import json
import logging
import time
import uuid
from collections import deque
from dataclasses import dataclass
from typing import Any, Protocol

from redis.asyncio import Redis
from redis.exceptions import RedisError

from chat.chats import CLOSE_DELETING, CLOSE_NOT_FOUND
from chat.store import Chat, ChatMessage, Store, StoreUnavailable, iso_now, message_id
from chat.users import User
from common.errors import BadRequest, Conflict
from common.tasks import backoff_delay, cancel_and_wait

log = logging.getLogger("barber.chat.fanout")

FANOUT_CHANNEL = "chat:fanout"
RECENT_MESSAGES = 256
CATCH_UP_PAGE = 200
# Close codes (application range 4000-4999; the admission ones are in chat.chats).
CLOSE_TOO_SLOW = 4408
CLOSE_UNAVAILABLE = 1013  # "try again later"
CLOSE_GOING_AWAY = 1001


@dataclass
class FanoutStats:
    stored: int = 0
    deduplicated: int = 0
    published: int = 0
    publish_failures: int = 0
    received: int = 0
    delivered: int = 0
    gap_filled: int = 0
    gaps_skipped: int = 0
    tail_recovered: int = 0
    resyncs: int = 0
    slow_disconnects: int = 0
    flood_rejections: int = 0
    store_failures: int = 0
    connections: int = 0
    write_batches: int = 0
    write_seconds: float = 0.0
    # Worst event-loop delay seen (a 100 ms timer firing late), in ms: a busy or starved
    # process shows here before it shows anywhere else.
    loop_lag_max_ms: float = 0.0

    def as_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = dict(self.__dict__)
        out["write_seconds"] = round(self.write_seconds, 3)
        out["loop_lag_max_ms"] = round(self.loop_lag_max_ms, 1)
        return out


class Transport(Protocol):
    """What a room needs from a socket (the WebSocket handler implements it)."""

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


# -- the Redis side ------------------------------------------------------------------------
class Bus:
    """Redis pub/sub: every chat instance subscribes to one fan-out channel.

    Each stored batch goes out as one PUBLISH (``<instance id>\n<frame>\n<frame>...``),
    published in order by one background task, so the write path never waits for Redis
    and a burst costs one round trip. An instance skips its own batches (it delivered
    them locally already) without parsing them.
    """

    def __init__(self, redis_url: str, hub: "Hub", channel: str = FANOUT_CHANNEL) -> None:
        self._redis = Redis.from_url(redis_url, socket_timeout=5, socket_connect_timeout=2, health_check_interval=15)
        self._hub = hub
        self.channel = channel
        self.instance_id = uuid.uuid4().hex[:12]
        self._me = self.instance_id.encode() + b"\n"
        self._pubsub: Any = None
        self._confirmed_once = False
        self._listen_task: asyncio.Task[None] | None = None
        self._publish_task: asyncio.Task[None] | None = None
        self._outbox: deque[ChatMessage] = deque()
        self._outbox_max = 50000
        self._outbox_ready = asyncio.Event()
        self.connected = False
        self.dropped = 0

    async def start(self) -> None:
        self._listen_task = asyncio.create_task(self._listen())
        self._publish_task = asyncio.create_task(self._publish_loop())

    async def stop(self) -> None:
        await cancel_and_wait(self._listen_task, self._publish_task)
        await self._reset()
        await self._redis.aclose()

    async def _reset(self) -> None:
        ps, self._pubsub = self._pubsub, None
        self.connected = False
        if ps is not None:
            try:
                await ps.aclose()
            except (RedisError, OSError):
                pass

    # -- receiving ----------------------------------------------------------------------
    async def _listen(self) -> None:
        attempt = 0
        while True:
            try:
                if self._pubsub is None:
                    self._pubsub = self._redis.pubsub()
                    await self._pubsub.subscribe(self.channel)
                msg = await self._pubsub.get_message(timeout=1.0)
                attempt = 0
                if msg is not None:
                    self._handle(msg)
            except asyncio.CancelledError:
                raise
            except (RedisError, OSError) as e:
                attempt += 1
                delay = backoff_delay(attempt, cap=2.0)
                if self.connected or attempt == 1:
                    log.warning("pub/sub connection lost (%s); reconnecting in %.2fs", e, delay)
                await self._reset()
                await asyncio.sleep(delay)

    def _handle(self, msg: dict[str, Any]) -> None:
        kind = msg.get("type")
        if kind == "subscribe":
            self.connected = True
            if self._confirmed_once:
                # Subscribed again after the connection dropped (ours or redis-py's own
                # reconnect): whatever was published meanwhile is read from MongoDB.
                self._hub.on_resubscribed()
            self._confirmed_once = True
            return
        if kind != "message":
            return
        self.connected = True
        data: bytes = msg["data"]
        if data.startswith(self._me):
            return
        frames = data.split(b"\n")[1:]
        for raw in frames:
            try:
                text = raw.decode()
                public = json.loads(text)
                if "control" in public:
                    self._hub.on_control(public)
                    continue
                message = ChatMessage.from_public(public, frame=text)
            except (ValueError, KeyError, TypeError) as e:
                log.warning("ignoring an unreadable published message: %s", e)
                continue
            self._hub.on_published(message)

    async def broadcast(self, control: dict[str, Any]) -> None:
        """Tell the other instances at once (e.g. close a chat's sockets). Best effort:
        an instance that misses it still refuses the chat on its next read of it."""
        try:
            await self._redis.publish(self.channel, self._me + json.dumps({"control": True, **control}).encode())
        except (RedisError, OSError) as e:
            log.warning("could not broadcast %s: %s", control.get("action"), e)

    # -- publishing ---------------------------------------------------------------------
    def publish(self, messages: list[ChatMessage]) -> None:
        """Queue for publishing (never blocks, never raises).

        Losing a publish loses nothing (receivers read gaps from MongoDB); the queue and
        its retries only keep the delay short while Redis is away."""
        self._outbox.extend(messages)
        while len(self._outbox) > self._outbox_max:
            self._outbox.popleft()
            self.dropped += 1
        self._outbox_ready.set()

    @property
    def backlog(self) -> int:
        return len(self._outbox)

    async def _publish_loop(self) -> None:
        attempt = 0
        while True:
            await self._outbox_ready.wait()
            self._outbox_ready.clear()
            while self._outbox:
                batch = list(itertools.islice(self._outbox, 0, 1000))
                payload = self._me + "\n".join(m.frame for m in batch).encode()
                try:
                    await self._redis.publish(self.channel, payload)
                except (RedisError, OSError) as e:
                    attempt += 1
                    self._hub.stats.publish_failures += 1
                    if attempt == 1:
                        log.warning("publish failed (%s); %d message(s) wait for Redis", e, len(self._outbox))
                    await asyncio.sleep(backoff_delay(attempt, cap=2.0))
                    continue
                if attempt:
                    log.info("publishing again after %d failed attempt(s)", attempt)
                attempt = 0
                self._hub.stats.published += len(batch)
                for _ in batch:
                    self._outbox.popleft()


# -- sockets ---------------------------------------------------------------------------
class Subscription:
    """One socket in one room, with its own delivery cursor."""

    _ids = itertools.count(1)

    def __init__(self, room: "Room", transport: Transport, user: User, cursor: int) -> None:
        self.id = next(self._ids)
        self.room = room
        self.transport = transport
        self.user = user
        self.cursor = cursor
        self.live = False
        self.closed = False
        self._task: asyncio.Task[None] | None = None

    def start_catch_up(self) -> None:
        self.live = False
        if self._task is None or self._task.done():
            self._task = asyncio.create_task(self._catch_up())

    def offer(self, msg: ChatMessage) -> None:
        """Called by the room, in seq order, for every message it delivers."""
        if not self.live or self.closed or msg.seq <= self.cursor:
            return
        if msg.seq == self.cursor + 1 and (
            self.transport.buffered_bytes + msg.frame_bytes <= self.room.hub.config.max_buffer_bytes
        ):
            self._send(msg)
        else:
            # Behind, or the client's backlog is full: continue from the room's recent
            # messages / MongoDB at the client's pace (and drop it if it takes nothing).
            self.start_catch_up()

    def _send(self, msg: ChatMessage) -> None:
        self.cursor = msg.seq
        if self.transport.is_closed:
            self.closed = True
            return
        self.transport.send_frame(msg.frame, msg.frame_bytes)
        self.room.hub.stats.delivered += 1

    async def _catch_up(self) -> None:
        hub = self.room.hub
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
                    batch = await hub.store.messages_after(self.room.chat_id, self.cursor, CATCH_UP_PAGE, upto=target)
                except StoreUnavailable:
                    attempt += 1
                    if attempt > 5:
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
            for msg in batch:
                if msg.seq <= self.cursor:
                    continue
                # Pace the replay by the client's reading speed, within the same buffer
                # bound as live delivery; a client that takes nothing for
                # CHAT_WS_SEND_TIMEOUT_S is not reading at all.
                if self.transport.buffered_bytes + msg.frame_bytes > hub.config.max_buffer_bytes:
                    if not await self.transport.drain(hub.send_timeout_s):
                        if not self.transport.is_closed:
                            hub.stats.slow_disconnects += 1
                            self.transport.close_with(CLOSE_TOO_SLOW, "client is not reading")
                        self.closed = True
                        return
                if self.closed or msg.seq <= self.cursor:
                    continue
                self._send(msg)
            if self.closed or self.transport.is_closed:
                self.closed = True
                return

    def stop(self) -> None:
        self.closed = True
        if self._task is not None and not self._task.done():
            self._task.cancel()


# -- rooms -----------------------------------------------------------------------------
class Room:
    def __init__(self, hub: "Hub", chat: Chat) -> None:
        self.hub = hub
        self.chat = chat
        self.chat_id = chat.chat_id
        self.subs: set[Subscription] = set()
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
            top = await self.hub.store.max_seq(self.chat_id)
            # The caller's copy of the chat may predate a deletion mark set meanwhile.
            fresh = await self.hub.store.get_chat(self.chat_id)
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

    def next_seq(self) -> int:
        return max(self.delivered, self.known_max) + 1

    def recent_after(self, seq: int) -> list[ChatMessage]:
        """The room's in-memory messages after ``seq``, if they continue from it."""
        if not self.recent or not (self.recent[0].seq <= seq + 1 <= self.recent[-1].seq):
            return []
        start = seq + 1 - self.recent[0].seq
        return list(itertools.islice(self.recent, start, None))

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
        hub = self.hub
        missing_since: float | None = None
        attempt = 0
        while self.pending and not self.closed:
            self._drain_pending()
            if not self.pending:
                return
            first_held = min(self.pending)
            try:
                found = await hub.store.messages_after(self.chat_id, self.delivered, CATCH_UP_PAGE, upto=first_held - 1)
            except StoreUnavailable:
                attempt += 1
                await asyncio.sleep(backoff_delay(attempt))
                continue
            attempt = 0
            for msg in found:
                if msg.seq > self.delivered:
                    hub.stats.gap_filled += 1
                self.accept(msg)
            if not self.pending or min(self.pending) == self.delivered + 1 or found:
                missing_since = None
                continue
            now = time.monotonic()
            if missing_since is None:
                missing_since = now
            if now - missing_since >= hub.gap_skip_s:
                first_held = min(self.pending)
                log.warning(
                    "chat %s: seq %d..%d absent from storage for %.1fs; skipping them",
                    self.chat_id, self.delivered + 1, first_held - 1, hub.gap_skip_s,
                )
                hub.stats.gaps_skipped += first_held - 1 - self.delivered
                self.delivered = first_held - 1
                self.recent.clear()
                missing_since = None
                continue
            await asyncio.sleep(0.1)

    async def check_tail(self) -> None:
        """Deliver whatever MongoDB holds beyond what this room delivered."""
        self.needs_check = False
        while not self.closed:
            found = await self.hub.store.messages_after(self.chat_id, self.delivered, CATCH_UP_PAGE)
            before = self.delivered
            for msg in found:
                self.accept(msg)
            self.hub.stats.tail_recovered += max(0, self.delivered - before)
            if len(found) < CATCH_UP_PAGE:
                return

    def close(self, code: int, reason: str) -> None:
        for sub in list(self.subs):
            sub.stop()
            sub.transport.close_with(code, reason)
        self.subs.clear()


# -- the write path ----------------------------------------------------------------------
@dataclass
class _PendingWrite:
    room: Room
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
    """

    def __init__(self, hub: "Hub", batch_max: int, write_timeout_s: float = 10.0) -> None:
        self.hub = hub
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

    async def submit(self, room: Room, doc: dict[str, Any]) -> ChatMessage:
        fut: asyncio.Future[ChatMessage] = asyncio.get_running_loop().create_future()
        p = _PendingWrite(room, doc, fut, time.monotonic() + self.write_timeout_s)
        queue = self._queues.setdefault(room.chat_id, deque())
        queue.append(p)
        if len(queue) == 1 and room.chat_id not in self._inflight:
            self._ready.append(room.chat_id)
        self._wake.set()
        return await fut

    async def _run(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            while self._ready:
                batch: list[_PendingWrite] = []
                while self._ready and len(batch) < self.batch_max:
                    chat_id = self._ready.popleft()
                    queue = self._queues.get(chat_id)
                    if not queue:
                        self._queues.pop(chat_id, None)
                        continue
                    self._inflight.add(chat_id)
                    batch.append(queue[0])
                try:
                    await self._write(batch)
                except asyncio.CancelledError:
                    raise
                except Exception:  # a bug must not kill the writer: fail this batch only
                    log.exception("message batch failed")
                    for p in batch:
                        self._finish(p, error=StoreUnavailable("message not stored; resend"))
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
            self.hub.stats.store_failures += 1
            p.future.set_exception(error)
        else:
            p.future.set_result(msg)  # type: ignore[arg-type]

    async def _write(self, batch: list[_PendingWrite]) -> None:
        # A chat closed for deletion while its messages waited here takes none of them.
        for p in [p for p in batch if p.room.refused]:
            self._finish(p, error=Conflict(p.room.refused or "chat is being deleted"))
        batch = [p for p in batch if not p.room.refused]
        if not batch:
            return
        for p in batch:
            if not p.seq_assigned:
                p.doc["seq"] = p.room.next_seq()
                p.seq_assigned = True
            p.attempts += 1
        started = time.monotonic()
        try:
            outcomes = await self.hub.store.insert_messages([p.doc for p in batch])
        except StoreUnavailable as e:
            # Unknown whether the batch landed: keep each message's _id and seq and retry;
            # one that did land reports a duplicate _id next time.
            now = time.monotonic()
            for p in batch:
                if now >= p.deadline:
                    self._finish(p, error=StoreUnavailable("message not stored (storage unavailable); resend it"))
            log.warning("storing %d message(s) failed: %s; retrying", len(batch), e)
            await asyncio.sleep(backoff_delay(batch[0].attempts))
            return
        took = time.monotonic() - started
        self.hub.stats.write_batches += 1
        self.hub.stats.write_seconds += took
        if took > 0.25:
            log.warning("storing %d message(s) took %.0f ms", len(batch), took * 1000)
        landed = [p for p, out in zip(batch, outcomes) if out.ok]
        deleted = await self._chats_deleted_meanwhile({p.room.chat_id for p in landed})
        if deleted:
            await self._remove_orphans([p for p in landed if p.room.chat_id in deleted], deleted)
        stored: list[ChatMessage] = []
        for p, out in zip(batch, outcomes):
            if out.ok and p.room.chat_id in deleted:
                self._finish(p, error=Conflict("chat deleted"))
            elif out.ok:
                msg = ChatMessage.from_doc(p.doc)
                self.hub.stats.stored += 1
                stored.append(msg)
                p.room.known_max = max(p.room.known_max, msg.seq)
                self._finish(p, msg)
                p.room.accept(msg)
            elif out.duplicate:
                await self._resolve_duplicate(p, stored)
            elif out.invalid:
                # Its seq was never taken (seqs follow what is stored): the next message
                # of the chat gets it.
                self._finish(p, error=BadRequest(f"message {out.error}"))
            else:
                self._finish(p, error=StoreUnavailable(f"message not stored: {out.error}"))
        if stored:
            self.hub.bus.publish(stored)

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
            return chat_ids - await self.hub.store.existing_chats(chat_ids)
        except StoreUnavailable as e:
            log.warning("could not re-check %d chat(s) after writing: %s", len(chat_ids), e)
            return set()

    async def _remove_orphans(self, writes: list[_PendingWrite], chat_ids: set[str]) -> None:
        """Remove what was written to deleted chats, then close their sockets (4404), so
        that a sender who sees the close knows nothing of theirs was left behind."""
        ids = [p.doc["_id"] for p in writes]
        for attempt in range(1, 6):
            try:
                await self.hub.store.delete_messages(ids)
                log.warning("removed %d message(s) written to deleted chat(s) %s", len(ids), sorted(chat_ids))
                break
            except StoreUnavailable as e:
                log.warning("removing %d message(s) of deleted chats failed (%s); retrying", len(ids), e)
                await asyncio.sleep(backoff_delay(attempt))
        else:
            log.error("could not remove %d message(s) of deleted chat(s) %s", len(ids), sorted(chat_ids))
        for chat_id in chat_ids:
            self.hub.close_chat(chat_id, CLOSE_NOT_FOUND, "chat deleted")

    async def _resolve_duplicate(self, p: _PendingWrite, stored: list[ChatMessage]) -> None:
        try:
            existing = await self.hub.store.message_by_id(p.doc["_id"])
            if existing is None:
                # Another writer took this seq: learn the chat's real end, try again.
                top = await self.hub.store.max_seq(p.room.chat_id)
                p.room.known_max = max(p.room.known_max, top)
                p.seq_assigned = False
                if p.attempts > 50:
                    self._finish(p, error=StoreUnavailable("chat too busy; resend"))
                return
        except StoreUnavailable:
            return  # retried with the same seq next round
        # Stored before (a retry after a lost reply, or the client resent it with the same
        # client_id): answer with the stored message and make sure everyone has it.
        self.hub.stats.deduplicated += 1
        p.room.known_max = max(p.room.known_max, existing.seq)
        self._finish(p, existing)
        p.room.accept(existing)
        stored.append(existing)


# -- the hub ---------------------------------------------------------------------------
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
        self.bus = Bus(redis_url, self)
        self.writer = Writer(self, config.write_batch_max)
        self.send_timeout_s = config.send_timeout_s
        self.gap_skip_s = config.gap_skip_s
        self._tail_task: asyncio.Task[None] | None = None
        self._tail_wake = asyncio.Event()
        self._background: set[asyncio.Task[None]] = set()

    async def start(self) -> None:
        await self.bus.start()
        self.writer.start()
        self._tail_task = asyncio.create_task(self._tail_loop())
        self.spawn(self._lag_loop())

    async def _lag_loop(self) -> None:
        while True:
            before = time.monotonic()
            await asyncio.sleep(0.1)
            lag = (time.monotonic() - before - 0.1) * 1000
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
        for task in list(self._background):
            task.cancel()

    def spawn(self, coro: Any) -> None:
        """Run ``coro`` in the background, keeping a reference until it finishes."""
        task = asyncio.ensure_future(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    @property
    def socket_count(self) -> int:
        return sum(len(r.subs) for r in self.rooms.values())

    # -- sockets joining and leaving ------------------------------------------------------
    async def join(self, chat: Chat, transport: Transport, user: User, since: int | None) -> Subscription:
        """Attach a socket; it receives every message after ``since`` (or the last
        ``CHAT_REPLAY_LAST``), then live ones. Raises StoreUnavailable."""
        room = self.rooms.get(chat.chat_id)
        if room is None:
            room = Room(self, chat)
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
        sub = Subscription(room, transport, user, cursor)
        room.subs.add(sub)
        sub.start_catch_up()
        return sub

    async def leave(self, sub: Subscription) -> None:
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

    def on_control(self, control: dict[str, Any]) -> None:
        if control.get("action") == "close_chat":
            self.close_chat(str(control["chat_id"]), int(control["code"]), str(control["reason"]))

    # -- messages -----------------------------------------------------------------------
    async def send(self, sub: Subscription, text: str, client_id: str | None) -> ChatMessage:
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

    def on_published(self, msg: ChatMessage) -> None:
        self.stats.received += 1
        room = self.rooms.get(msg.chat_id)
        if room is None:
            return
        if room.ready.done():
            room.accept(msg)
        else:
            room.early.append(msg)

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

    async def _tail_loop(self) -> None:
        interval = self.config.tail_check_s
        while True:
            try:
                await asyncio.wait_for(self._tail_wake.wait(), min(1.0, interval / 2))
            except TimeoutError:
                pass
            self._tail_wake.clear()
            now = time.monotonic()
            for room in list(self.rooms.values()):
                if room.closed or not room.ready.done() or room.ready.exception() is not None:
                    continue
                if not room.needs_check and now - room.last_delivery < interval:
                    continue
                try:
                    await room.check_tail()
                except StoreUnavailable as e:
                    log.warning("tail check of chat %s failed: %s", room.chat_id, e)
                    room.needs_check = True
                    break
                room.last_delivery = now
