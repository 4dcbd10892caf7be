"""The user cache: authen's ``/utilities/check`` answers, sharded over the Redis Cluster.

Keys are ``user:<id>`` (spread over the cluster's hash slots; adding a node moves only
the slots migrated to it). The cache is an optimisation and never a dependency: every
cluster error or slow answer (a master failing over, the whole cluster down) counts as
a miss, and for ``USER_CACHE_COOLDOWN_S`` after an error the cache is skipped entirely,
so an outage costs no added latency per lookup. Only :meth:`UserCache.invalidate` raises,
because a deletion must know whether the stale entry is gone.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Awaitable
from dataclasses import dataclass
from typing import Any, TypeVar

from redis.asyncio.cluster import ClusterNode, RedisCluster
from redis.exceptions import RedisClusterException, RedisError

log = logging.getLogger("barber.chat.cache")

T = TypeVar("T")

# Everything a cache operation may raise when the cluster is unwell. RedisClusterException
# (no reachable node, slot not covered) is not a RedisError, hence listed on its own.
CACHE_ERRORS = (RedisError, RedisClusterException, OSError, TimeoutError)


# Longer than any lookup can take from its authen call to its cache write.
TOMBSTONE = "deleted"
TOMBSTONE_TTL_S = 120
# How long an invalidation may take (set, then WAIT for a replica).
INVALIDATE_TIMEOUT_S = 2.0


class CacheError(Exception):
    """The cluster could not complete an operation that must not be skipped."""


def parse_nodes(spec: str) -> list[ClusterNode]:
    nodes = []
    for part in spec.split(","):
        part = part.strip()
        if not part:
            continue
        host, _, port = part.rpartition(":")
        if not host or not port.isdigit():
            raise ValueError(f"REDIS_CLUSTER_NODES: {part!r} is not host:port")
        nodes.append(ClusterNode(host, int(port)))
    if not nodes:
        raise ValueError("REDIS_CLUSTER_NODES: no nodes given")
    return nodes


def user_key(user_id: int) -> str:
    return f"user:{user_id}"


@dataclass
class CacheStats:
    hits: int = 0
    misses: int = 0
    stores: int = 0
    errors: int = 0
    skipped: int = 0
    invalidations: int = 0

    def as_dict(self) -> dict[str, int]:
        return {
            "hits": self.hits,
            "misses": self.misses,
            "stores": self.stores,
            "errors": self.errors,
            "skipped": self.skipped,
            "invalidations": self.invalidations,
        }


class UserCache:
    def __init__(self, nodes: str, *, ttl_s: int = 3600, op_timeout_s: float = 0.25, cooldown_s: float = 1.0) -> None:
        self._nodes = parse_nodes(nodes)
        self.ttl_s = ttl_s
        self.op_timeout_s = op_timeout_s
        self.cooldown_s = cooldown_s
        self.stats = CacheStats()
        self._client: RedisCluster | None = None
        self._skip_until = 0.0
        self.last_error: str | None = None
        self._closing: set[asyncio.Future[None]] = set()

    def _redis(self) -> RedisCluster:
        # Built lazily and rebuilt after a failed start: RedisCluster learns the slot map
        # on first use, which fails while the cluster is down.
        if self._client is None:
            self._client = RedisCluster(
                startup_nodes=self._nodes,
                decode_responses=True,
                socket_timeout=self.op_timeout_s,
                socket_connect_timeout=self.op_timeout_s,
                require_full_coverage=False,
            )
        return self._client

    async def _run(self, op: Awaitable[T], timeout_s: float | None = None) -> T:
        try:
            return await asyncio.wait_for(op, timeout_s or self.op_timeout_s)
        except AttributeError as e:
            # redis-py's asyncio connection can be torn down (its writer set to None) by a
            # timeout elsewhere while a command is being written on it; seen under load as
            # "'NoneType' object has no attribute 'writelines'", which failed a socket's
            # admission. It is a cache failure like any other: fall back to authen.
            raise RedisError(f"cache connection torn down mid-command: {e}") from e

    def _failed(self, what: str, e: BaseException) -> None:
        self.stats.errors += 1
        self.last_error = f"{type(e).__name__}: {e}"
        self._skip_until = time.monotonic() + self.cooldown_s
        log.warning(
            "user cache %s failed (%s); using authen directly for %.1fs", what, self.last_error, self.cooldown_s
        )
        client = self._client
        if client is not None and isinstance(e, RedisClusterException):
            # The client could not learn the slot map (cluster unreachable): start from the
            # seed nodes again on the next use rather than from its stale view.
            self._client = None
            task = asyncio.ensure_future(client.aclose())
            self._closing.add(task)
            task.add_done_callback(self._closing.discard)

    @property
    def available(self) -> bool:
        return time.monotonic() >= self._skip_until

    async def get(self, user_id: int) -> dict[str, Any] | None:
        """The cached entry, or None on a miss or any cache trouble."""
        if not self.available:
            self.stats.skipped += 1
            return None
        try:
            raw = await self._run(self._redis().get(user_key(user_id)))
        except CACHE_ERRORS as e:
            self._failed("read", e)
            return None
        if raw is None or raw == TOMBSTONE:
            self.stats.misses += 1
            return None
        try:
            data = json.loads(raw)
        except ValueError:
            self.stats.misses += 1
            log.warning("discarding unreadable cache entry for user#%d", user_id)
            return None
        self.stats.hits += 1
        log.info("Using cached data for user#%d", user_id, extra={"user.id": user_id, "event.action": "cache-hit"})
        return data

    async def put(self, user_id: int, data: dict[str, Any]) -> None:
        if not self.available:
            return
        try:
            # NX: never over a tombstone (a lookup that raced with a deletion must not
            # bring the deleted user back); entries are only ever written on a miss anyway.
            await self._run(self._redis().set(user_key(user_id), json.dumps(data), ex=self.ttl_s, nx=True))
        except CACHE_ERRORS as e:
            self._failed("write", e)
            return
        self.stats.stores += 1
        log.info("Cached data for user#%d", user_id, extra={"user.id": user_id, "event.action": "cache-store"})

    async def invalidate(self, user_id: int) -> None:
        """Remove ``user:<id>``'s data; raises :class:`CacheError` if the cluster cannot confirm it.

        What is left is a short-lived tombstone, so that a lookup which read the user from
        authen just before the deletion committed cannot store it again afterwards."""
        key = user_key(user_id)
        # Off the hot path (deletions only): more time than a lookup gets, and WAIT bounds
        # itself below it, so a replica that does not confirm is a clear "not yet".
        budget_s = max(self.op_timeout_s, INVALIDATE_TIMEOUT_S)
        try:
            client = self._redis()
            await self._run(client.set(key, TOMBSTONE, ex=TOMBSTONE_TTL_S), budget_s)
            # On a replica too: a master that failed over before replicating the tombstone
            # would otherwise hand the deleted user's entry back through its promoted replica.
            replicated = await self._run(
                client.execute_command("WAIT", 1, int(budget_s * 500), target_nodes=client.get_node_from_key(key)),
                budget_s,
            )
        except CACHE_ERRORS as e:
            self._failed("invalidate", e)
            raise CacheError(f"could not invalidate user#{user_id}: {self.last_error}") from e
        if int(replicated) < 1:
            raise CacheError(f"invalidation of user#{user_id} not yet confirmed by a replica")
        self.stats.invalidations += 1
        log.info("Invalidated cached data for user#%d", user_id, extra={"user.id": user_id})

    async def close(self) -> None:
        if self._client is not None:
            await self._client.aclose()
            self._client = None
