"""Redis pub/sub between chat instances: publishing stored batches, receiving the others'."""

from __future__ import annotations

import asyncio
import itertools
import json
import logging
import uuid
from collections import deque
from typing import Any, Protocol

from redis.asyncio import Redis
from redis.exceptions import RedisError

from chat.fanout.stats import FanoutStats
from chat.store import ChatMessage
from common.tasks import backoff_delay, cancel_and_wait

log = logging.getLogger("barber.chat.fanout")

FANOUT_CHANNEL = "chat:fanout"
OUTBOX_MAX = 50000
PUBLISH_BATCH = 1000


class BusListener(Protocol):
    """What the bus hands on (the hub implements it)."""

    def on_published(self, msg: ChatMessage) -> None:
        """A message another instance stored."""

    def on_control(self, control: dict[str, Any]) -> None:
        """A control message another instance broadcast (e.g. close a chat)."""

    def on_resubscribed(self) -> None:
        """The channel is subscribed again after a lost connection: messages published
        meanwhile were missed."""


class Bus:
    """Redis pub/sub: every chat instance subscribes to one fan-out channel.

    Each stored batch goes out as one PUBLISH (``<instance id>\n<frame>\n<frame>...``),
    published in order by one background task, so the write path never waits for Redis
    and a burst costs one round trip. An instance skips its own batches (it delivered
    them locally already) without parsing them.
    """

    def __init__(
        self,
        redis_url: str,
        listener: BusListener,
        stats: FanoutStats,
        channel: str = FANOUT_CHANNEL,
        outbox_max: int = OUTBOX_MAX,
    ) -> None:
        self._redis = Redis.from_url(redis_url, socket_timeout=5, socket_connect_timeout=2, health_check_interval=15)
        self._listener = listener
        self._stats = stats
        self.channel = channel
        self.instance_id = uuid.uuid4().hex[:12]
        self._me = self.instance_id.encode() + b"\n"
        self._pubsub: Any = None
        self._confirmed_once = False
        self._listen_task: asyncio.Task[None] | None = None
        self._publish_task: asyncio.Task[None] | None = None
        self._outbox: deque[ChatMessage] = deque()
        self._outbox_max = outbox_max
        self._outbox_ready = asyncio.Event()
        self.connected = False

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
                    self.handle(msg)
            except asyncio.CancelledError:
                raise
            except (RedisError, OSError) as e:
                attempt += 1
                delay = backoff_delay(attempt, cap=2.0)
                if self.connected or attempt == 1:
                    log.warning("pub/sub connection lost (%s); reconnecting in %.2fs", e, delay)
                await self._reset()
                await asyncio.sleep(delay)

    def handle(self, msg: dict[str, Any]) -> None:
        """Take one pub/sub message (a redis-py message dict)."""
        kind = msg.get("type")
        if kind == "subscribe":
            self.connected = True
            if self._confirmed_once:
                # Subscribed again after the connection dropped (ours or redis-py's own
                # reconnect): whatever was published meanwhile is read from MongoDB.
                self._listener.on_resubscribed()
            self._confirmed_once = True
            return
        if kind != "message":
            return
        self.connected = True
        data: bytes = msg["data"]
        if data.startswith(self._me):
            return
        for raw in data.split(b"\n")[1:]:
            self._handle_frame(raw)

    def _handle_frame(self, raw: bytes) -> None:
        try:
            text = raw.decode()
            public = json.loads(text)
            if "control" in public:
                self._listener.on_control(public)
                return
            message = ChatMessage.from_public(public, frame=text)
        except (ValueError, KeyError, TypeError) as e:
            log.warning("ignoring an unreadable published message: %s", e)
            return
        self._listener.on_published(message)

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
            self._stats.publish_dropped += 1
        self._outbox_ready.set()

    @property
    def backlog(self) -> int:
        return len(self._outbox)

    def _next_payload(self) -> tuple[int, bytes]:
        batch = list(itertools.islice(self._outbox, 0, PUBLISH_BATCH))
        return len(batch), self._me + "\n".join(m.frame for m in batch).encode()

    async def _publish_loop(self) -> None:
        attempt = 0
        while True:
            await self._outbox_ready.wait()
            self._outbox_ready.clear()
            while self._outbox:
                count, payload = self._next_payload()
                try:
                    await self._redis.publish(self.channel, payload)
                except (RedisError, OSError) as e:
                    attempt += 1
                    self._stats.publish_failures += 1
                    if attempt == 1:
                        log.warning("publish failed (%s); %d message(s) wait for Redis", e, len(self._outbox))
                    await asyncio.sleep(backoff_delay(attempt, cap=2.0))
                    continue
                if attempt:
                    log.info("publishing again after %d failed attempt(s)", attempt)
                attempt = 0
                self._stats.published += count
                for _ in range(count):
                    self._outbox.popleft()
