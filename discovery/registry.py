"""The registry: live service instances in the standalone Redis, under TTLs.

Keys (all under ``barber:disc:``)::

    epoch               random id, re-made when Redis loses its data (part of every version)
    types               set of service types that have (had) instances
    ids:<type>          set of instance ids of that type
    inst:<id>           hash {instance_id, type, host, port, registered_at, addr_key}, PX ttl
    addr:<type>:<h>:<p> instance id registered at that address, PX ttl
    ver:<type>          counter bumped on every change of the type's instance set

Each operation is one Lua script, so it is atomic and costs one round trip. A crashed
instance leaves nothing behind: its ``inst`` and ``addr`` keys expire on their own, and
the sweep (or the next listing) drops the dangling id from ``ids:<type>``, bumps the
version and announces the change on the ``changes`` channel, which every discovery
process listens to so its long-polling watchers answer at once.
"""

from __future__ import annotations

import asyncio
import builtins
import logging
import re
import secrets
import time
import uuid
from dataclasses import dataclass
from typing import Any

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from common.errors import ServiceUnavailable
from common.tasks import backoff_delay, cancel_and_wait

log = logging.getLogger("barber.discovery.registry")

PREFIX = "barber:disc:"
CHANGES_CHANNEL = PREFIX + "changes"
# Always used whole (fullmatch in Python; the anchors are for pydantic's pattern, whose
# engine treats ``$`` as the end of the text and would otherwise search).
TYPE_RE = re.compile(r"^[a-z][a-z0-9_-]{0,63}$")

# Returns the epoch, creating it when Redis has none (a fresh or wiped Redis).
_EPOCH = """
local e = redis.call('GET', ARGV[1] .. 'epoch')
if not e then
  e = ARGV[2]
  redis.call('SET', ARGV[1] .. 'epoch', e)
end
"""

REGISTER_LUA = (
    """
-- ARGV: prefix, new_epoch, type, id, host, port, ttl_ms, now_ms
local p = ARGV[1]
"""
    + _EPOCH
    + """
local t, id, host, port, ttl = ARGV[3], ARGV[4], ARGV[5], ARGV[6], tonumber(ARGV[7])
local addr_key = p .. 'addr:' .. t .. ':' .. host .. ':' .. port
-- One address is one instance: a process restarted on the same port replaces its old record.
local old = redis.call('GET', addr_key)
if old and old ~= id then
  redis.call('DEL', p .. 'inst:' .. old)
  redis.call('SREM', p .. 'ids:' .. t, old)
end
redis.call('HSET', p .. 'inst:' .. id, 'instance_id', id, 'type', t, 'host', host, 'port', port,
           'registered_at', ARGV[8], 'addr_key', addr_key)
redis.call('PEXPIRE', p .. 'inst:' .. id, ttl)
redis.call('SET', addr_key, id, 'PX', ttl)
redis.call('SADD', p .. 'ids:' .. t, id)
redis.call('SADD', p .. 'types', t)
local v = redis.call('INCR', p .. 'ver:' .. t)
redis.call('PUBLISH', p .. 'changes', t)
return {e, v}
"""
)

HEARTBEAT_LUA = """
-- ARGV: prefix, id, ttl_ms. Returns 1 when renewed, 0 when the registration is gone.
local p = ARGV[1]
local key = p .. 'inst:' .. ARGV[2]
local addr_key = redis.call('HGET', key, 'addr_key')
if not addr_key then return 0 end
redis.call('PEXPIRE', key, tonumber(ARGV[3]))
if redis.call('GET', addr_key) == ARGV[2] then
  redis.call('PEXPIRE', addr_key, tonumber(ARGV[3]))
end
return 1
"""

DEREGISTER_LUA = """
-- ARGV: prefix, id. Returns the type of the removed instance, or false.
local p = ARGV[1]
local key = p .. 'inst:' .. ARGV[2]
local rec = redis.call('HMGET', key, 'type', 'addr_key')
if not rec[1] then return 0 end
redis.call('DEL', key)
if redis.call('GET', rec[2]) == ARGV[2] then redis.call('DEL', rec[2]) end
redis.call('SREM', p .. 'ids:' .. rec[1], ARGV[2])
redis.call('INCR', p .. 'ver:' .. rec[1])
redis.call('PUBLISH', p .. 'changes', rec[1])
return rec[1]
"""

LIST_LUA = (
    """
-- ARGV: prefix, new_epoch, type. Drops ids whose record expired (announcing the change).
local p = ARGV[1]
"""
    + _EPOCH
    + """
local t = ARGV[3]
local ids = redis.call('SMEMBERS', p .. 'ids:' .. t)
local out = {}
local dropped = 0
for _, id in ipairs(ids) do
  local rec = redis.call('HMGET', p .. 'inst:' .. id, 'host', 'port')
  if rec[1] then
    table.insert(out, id)
    table.insert(out, rec[1])
    table.insert(out, rec[2])
  else
    redis.call('SREM', p .. 'ids:' .. t, id)
    dropped = dropped + 1
  end
end
local v
if dropped > 0 then
  v = redis.call('INCR', p .. 'ver:' .. t)
  redis.call('PUBLISH', p .. 'changes', t)
else
  v = tonumber(redis.call('GET', p .. 'ver:' .. t) or '0')
end
if #out == 0 then redis.call('SREM', p .. 'types', t) end
return {e, v, dropped, out}
"""
)


@dataclass(frozen=True, slots=True)
class Listing:
    type: str
    version: str
    instances: list[dict[str, Any]]
    dropped: int = 0

    def as_dict(self) -> dict[str, Any]:
        return {"type": self.type, "version": self.version, "instances": self.instances}


def new_instance_id(type_: str) -> str:
    return f"{type_}-{uuid.uuid4().hex[:12]}"


class Registry:
    """Register, renew, remove and list instances; every call is one atomic script."""

    def __init__(self, redis: aioredis.Redis, ttl_s: float) -> None:
        self.redis = redis
        self.ttl_ms = int(ttl_s * 1000)
        self._register = redis.register_script(REGISTER_LUA)
        self._heartbeat = redis.register_script(HEARTBEAT_LUA)
        self._deregister = redis.register_script(DEREGISTER_LUA)
        self._list = redis.register_script(LIST_LUA)

    @property
    def ttl_s(self) -> float:
        return self.ttl_ms / 1000

    async def _run(self, script: Any, args: list[Any]) -> Any:
        try:
            return await script(keys=[], args=args)
        except (RedisError, OSError) as e:
            raise ServiceUnavailable("registry storage (Redis) is unavailable") from e

    async def register(self, type_: str, host: str, port: int) -> str:
        instance_id = new_instance_id(type_)
        await self._run(
            self._register,
            [PREFIX, secrets.token_hex(4), type_, instance_id, host, port, self.ttl_ms, int(time.time() * 1000)],
        )
        return instance_id

    async def heartbeat(self, instance_id: str) -> bool:
        return bool(await self._run(self._heartbeat, [PREFIX, instance_id, self.ttl_ms]))

    async def deregister(self, instance_id: str) -> str | None:
        """Remove a registration; the type it had, or None if there was none."""
        type_ = await self._run(self._deregister, [PREFIX, instance_id])
        return _s(type_) if type_ else None

    async def list(self, type_: str) -> Listing:
        epoch, version, dropped, flat = await self._run(self._list, [PREFIX, secrets.token_hex(4), type_])
        instances = [
            {"instance_id": _s(flat[i]), "type": type_, "host": _s(flat[i + 1]), "port": int(flat[i + 2])}
            for i in range(0, len(flat), 3)
        ]
        instances.sort(key=lambda r: str(r["instance_id"]))
        return Listing(type_, f"{_s(epoch)}.{int(version)}", instances, int(dropped))

    # builtins.list: this class's own list() method shadows the name in its body.
    async def types(self) -> builtins.list[str]:
        try:
            return sorted(_s(t) for t in await self.redis.smembers(PREFIX + "types"))
        except (RedisError, OSError) as e:
            raise ServiceUnavailable("registry storage (Redis) is unavailable") from e

    async def ping(self) -> bool:
        try:
            return bool(await self.redis.ping())
        except (RedisError, OSError):
            return False


def _s(v: bytes | str) -> str:
    return v.decode() if isinstance(v, bytes) else v


class Watchers:
    """Long-poll support: an event per type that fires (and is replaced) on each change."""

    def __init__(self) -> None:
        self._events: dict[str, asyncio.Event] = {}
        # Long polls waiting right now, per type (shown in /status).
        self.waiting: dict[str, int] = {}
        self.closed = False

    def event(self, type_: str) -> asyncio.Event:
        ev = self._events.get(type_)
        if ev is None:
            ev = self._events[type_] = asyncio.Event()
        return ev

    def release(self, type_: str, ev: asyncio.Event) -> None:
        """Forget ``type_``'s event once no long poll waits on it."""
        if not self.waiting.get(type_) and self._events.get(type_) is ev:
            del self._events[type_]

    @property
    def size(self) -> int:
        return len(self._events)

    def notify(self, type_: str) -> None:
        ev = self._events.pop(type_, None)
        if ev is not None:
            ev.set()

    def notify_all(self) -> None:
        for type_ in list(self._events):
            self.notify(type_)

    def close(self) -> None:
        """Stopping: answer every long poll now, and do not hold new ones."""
        self.closed = True
        self.notify_all()


async def wait_for_change(
    registry: Registry, watchers: Watchers, type_: str, version: str | None, wait_s: float
) -> Listing:
    """The current listing, or, if it still has ``version``, the next one within ``wait_s``.

    A type's event exists only while a long poll holds it, so asking about any number of
    made-up type names leaves nothing behind."""
    deadline = asyncio.get_running_loop().time() + wait_s
    while True:
        # Take the event before reading, so a change between the read and the wait is not missed.
        ev = watchers.event(type_) if version is not None and wait_s > 0 else None
        if ev is not None:
            # Counted from the moment the event is taken: another poll finishing meanwhile
            # must not release an event this one is about to wait on (a missed change).
            watchers.waiting[type_] = watchers.waiting.get(type_, 0) + 1
        try:
            listing = await registry.list(type_)
            remaining = deadline - asyncio.get_running_loop().time()
            if ev is None or listing.version != version or remaining <= 0 or watchers.closed:
                return listing
            try:
                await asyncio.wait_for(ev.wait(), remaining)
                if watchers.closed:
                    return listing
            except TimeoutError:
                return await registry.list(type_)
        finally:
            if ev is not None:
                watchers.waiting[type_] -= 1
                if not watchers.waiting[type_]:
                    del watchers.waiting[type_]
                watchers.release(type_, ev)


class ChangeFeed:
    """Listens to the changes channel (other discovery processes' changes) and sweeps.

    The sweep lists every known type each interval; listing drops expired instances and
    announces them, so watchers learn of a crashed instance about one interval after its
    TTL, without relying on Redis keyspace notifications being configured.
    """

    def __init__(self, registry: Registry, watchers: Watchers, sweep_interval_s: float) -> None:
        self.registry = registry
        self.watchers = watchers
        self.sweep_interval_s = sweep_interval_s
        self._tasks: list[asyncio.Task[None]] = []
        self.redis_ok = True

    def start(self) -> None:
        self._tasks = [asyncio.create_task(self._listen()), asyncio.create_task(self._sweep())]

    async def stop(self) -> None:
        await cancel_and_wait(*self._tasks)

    async def _listen(self) -> None:
        attempt = 0
        while True:
            pubsub = self.registry.redis.pubsub()
            try:
                await pubsub.subscribe(CHANGES_CHANNEL)
                if attempt:
                    log.info("change feed reconnected")
                    # Anything may have changed while we were deaf: let every watcher re-read.
                    self.watchers.notify_all()
                attempt = 0
                async for message in pubsub.listen():
                    if message.get("type") == "message":
                        self.watchers.notify(_s(message["data"]))
            except asyncio.CancelledError:
                raise
            except (RedisError, OSError) as e:
                attempt += 1
                delay = backoff_delay(attempt, cap=2.0, base=0.1)
                if attempt == 1:
                    log.warning("change feed lost (%s); reconnecting", e)
                await asyncio.sleep(delay)
            finally:
                try:
                    await pubsub.aclose()
                except (RedisError, OSError):
                    pass

    async def _sweep(self) -> None:
        while True:
            await asyncio.sleep(self.sweep_interval_s)
            try:
                for type_ in await self.registry.types():
                    listing = await self.registry.list(type_)
                    if listing.dropped:
                        log.info("%d %s instance(s) expired", listing.dropped, type_)
                        self.watchers.notify(type_)
                if not self.redis_ok:
                    log.info("registry storage (Redis) is reachable again")
                self.redis_ok = True
            except ServiceUnavailable as e:
                if self.redis_ok:
                    log.error("sweep failed: %s", e)
                self.redis_ok = False
