"""The shared WAL high-water mark behind read-your-writes across instances.

After every committed write an instance publishes the primary's WAL position; the
shared mark is the maximum ever published (kept in Redis, raised by a tiny Lua script
so concurrent publishers never lower it). A read is served by a replica only if that
replica has replayed at least up to the mark, so once any instance acknowledged a
write, no instance reads state older than it.

Positions are stored as 16 hex digits, so Lua compares them exactly as strings
(Lua numbers are doubles and would lose precision above 2**53).

When Redis cannot be reached the mark is *unknown* (``None``): the router then prefers
the primary, which always has every write. A mark this instance could not publish is
kept and published again by the router's background monitor.
"""

from __future__ import annotations

import logging
import time

from redis.asyncio import Redis
from redis.exceptions import RedisError

log = logging.getLogger("barber.replicas.hwm")

# Raise KEYS[1] to ARGV[1] unless it already holds a later position.
_RAISE_SCRIPT = """
local cur = redis.call('GET', KEYS[1])
if (not cur) or ARGV[1] > cur then
  redis.call('SET', KEYS[1], ARGV[1])
  return ARGV[1]
end
return cur
"""


def encode_lsn(lsn: int) -> str:
    return f"{lsn:016x}"


def decode_lsn(raw: bytes | str) -> int:
    return int(raw, 16)


def format_lsn(lsn: int | None) -> str | None:
    """PostgreSQL's own notation (``16/B374D848``), for status pages and logs."""
    if lsn is None:
        return None
    return f"{lsn >> 32:X}/{lsn & 0xFFFFFFFF:X}"


class HighWaterMark:
    """Publish and read the shared mark; degrade to "unknown" while Redis is down."""

    def __init__(self, redis: Redis | None, key: str, *, retry_after_s: float = 1.0) -> None:
        self._redis = redis
        self.key = key
        self._retry_after_s = retry_after_s
        self._down_until = 0.0
        self._raise = redis.register_script(_RAISE_SCRIPT) if redis is not None else None
        # The highest position this instance itself wrote at (published or not).
        self.local = 0
        # A position that could not be published yet; the monitor retries it.
        self.pending = 0
        # The last value read from the store (for the status page only).
        self.last_seen: int | None = None
        self.errors = 0

    @property
    def available(self) -> bool:
        return self._redis is not None and time.monotonic() >= self._down_until

    def _failed(self, what: str, e: Exception) -> None:
        # Skip the store for a moment so a Redis outage costs one timeout, not one per read.
        self.errors += 1
        if self.available:
            log.warning("high-water mark store unavailable (%s: %s); reads prefer the primary", what, e)
        self._down_until = time.monotonic() + self._retry_after_s

    async def publish(self, lsn: int) -> None:
        """Record that a write at ``lsn`` was acknowledged. Never raises."""
        self.local = max(self.local, lsn)
        if self._raise is None:
            return
        if not self.available:
            self.pending = max(self.pending, lsn)
            return
        try:
            await self._raise(keys=[self.key], args=[encode_lsn(lsn)])
        except RedisError as e:
            self.pending = max(self.pending, lsn)
            self._failed("publish", e)

    async def current(self) -> int | None:
        """The mark a read must honour, or None when it cannot be known.

        This is the read hot path's one round trip (a GET).
        """
        if not self.available:
            return None
        try:
            raw = await self._redis.get(self.key)  # type: ignore[union-attr]
        except RedisError as e:
            self._failed("read", e)
            return None
        if raw is None:
            # Never written, or lost with a Redis restart: the monitor seeds it again.
            return None
        value = decode_lsn(raw)
        self.last_seen = value
        return max(value, self.local)

    async def maintain(self, primary_lsn: int | None) -> None:
        """Background upkeep: publish a pending mark; seed a missing one.

        Seeding uses the primary's current position, which covers every write acknowledged
        before it, so a mark lost with Redis's data errs towards reading the primary.
        """
        if self._redis is None or not self.available:
            return
        try:
            if self.pending:
                await self._raise(keys=[self.key], args=[encode_lsn(self.pending)])  # type: ignore[misc]
                log.info("published pending high-water mark %s", format_lsn(self.pending))
                self.pending = 0
            if primary_lsn is not None:
                await self._redis.set(self.key, encode_lsn(max(primary_lsn, self.local)), nx=True)
        except RedisError as e:
            self._failed("maintain", e)
