"""Admission: the per-instance task limit, per-client rate limits and load counts.

Usually no Redis round trip at all: each gateway *leases* slots of an instance's task
limit from Redis and admits requests on slots it holds, locally. A request that finds no
leased slot free on its first (round-robin) candidate goes to Redis: one Lua script
chooses an instance under ``TASK_LIMIT_PER_SERVICE`` over all gateways' leases, takes a
token from the client's bucket when a rate rule applies, counts the instance's load, and
leases a few spare slots with the admission (at most ``LEASE_BLOCK``, and at most a
quarter of what is left free, so near the limit leases are exact and one gateway cannot
starve another). The scripts of requests arriving while one is in flight are batched into
the next call. Spares this gateway does not use go back within ``LEASE_IDLE_S``; beyond
``LEASE_BLOCK`` they go back at once. ``least_outstanding`` needs every gateway's exact
counts, so it leases no spares (one round trip a request, as rate-limited requests).

Leases are owned per gateway, so a gateway killed mid-request leaks nothing:
``barber:gw:tasks:<instance>`` is a hash ``{gateway id: slots it holds}``, and
``barber:gw:alive:<gateway id>`` lives ``LIMITER_OWNER_TTL_MS`` unless renewed. The
script sums only the fields of live gateways (and deletes the others). Each call also
writes this gateway's *absolute* counts for the instances it passes (not increments), and
calls are strictly one at a time, so returning slots needs no round trip of its own (it
is carried by the next call or the periodic heartbeat), a lost reply heals on the next
call, and a Redis that restarted empty is refilled at once. A gateway holds at least the
slots it has in flight, so other gateways may see a count high (by its spares, or for
some milliseconds after a release), never low: the limit is never exceeded.

Load counts of admissions made on leased slots are added in Redis with the next call
(at most ``LOAD_SYNC_S`` later); the call that takes an instance past the threshold
reports it, so a load alert is still raised once per instance per second over all
gateways.

With ``TASK_LIMIT_SCOPE=local`` each gateway admits by its own counts (no round trip
unless a rate limit applies: then the script only takes the token) and still publishes
its counts. When Redis is unreachable, admission falls back to this gateway's own counts
(limits become local), rate limits fail open, and both are logged once per outage.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from common.tasks import cancel_and_wait

log = logging.getLogger("barber.gateway.limiter")

PREFIX = "barber:gw:"
RELEASE_SYNC_DELAY_S = 0.05
# Spare slots leased with an admission (round robin), and how long unused ones are kept.
LEASE_BLOCK = 8
LEASE_IDLE_S = 0.25
# Load counts of locally admitted requests reach Redis at most this late.
LOAD_SYNC_S = 0.05

ADMIT_LUA = """
-- ARGV: prefix, gateway id, owner ttl ms, load threshold, spare block,
--       n_own, (instance, slots held) * n_own, n_hits, (instance, hits) * n_hits,
--       n_req, per request: policy, limit, rl_key, rl_rate_per_s, rl_burst, n_cand, cand * n_cand
-- Returns {per request {code, value, load}, {instance, spare} *, {instance, load} *}:
-- code 1 admitted (value = instance, load = its requests this second), 2 every candidate
-- full, 3 rate limited (value = retry ms), 4 within the rate limit (policy 'none': the
-- caller admits by its own counts). Spares are extra slots leased to this gateway with an
-- admission ('rr' only, at most a quarter of what is left free); the last list names the
-- instances whose load crossed the threshold in this call (exactly one call crosses).
local p, gw = ARGV[1], ARGV[2]
local task_ttl = tonumber(ARGV[3]) * 10
local threshold, block = tonumber(ARGV[4]), tonumber(ARGV[5])
redis.call('SET', p .. 'alive:' .. gw, '1', 'PX', ARGV[3])
local i = 6
local n_own = tonumber(ARGV[i]); i = i + 1
for _ = 1, n_own do
  local key = p .. 'tasks:' .. ARGV[i]
  if tonumber(ARGV[i + 1]) > 0 then
    redis.call('HSET', key, gw, ARGV[i + 1])
    redis.call('PEXPIRE', key, task_ttl)
  else
    redis.call('HDEL', key, gw)
  end
  i = i + 2
end
local t = redis.call('TIME')
local now_ms = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local sec = t[1]
local alerts = {}
local function count_load(inst, n)
  local lkey = p .. 'load:' .. inst .. ':' .. sec
  local load = redis.call('INCRBY', lkey, n)
  if load == n then redis.call('EXPIRE', lkey, 2) end
  if load > threshold and load - n <= threshold then
    table.insert(alerts, inst); table.insert(alerts, load)
  end
  return load
end
local n_hits = tonumber(ARGV[i]); i = i + 1
for _ = 1, n_hits do
  count_load(ARGV[i], tonumber(ARGV[i + 1]))
  i = i + 2
end
local totals = {}
local alive = {[gw] = true}
local function total(inst)
  if totals[inst] then return totals[inst] end
  local key = p .. 'tasks:' .. inst
  local flat = redis.call('HGETALL', key)
  local sum = 0
  for j = 1, #flat, 2 do
    local owner = flat[j]
    if alive[owner] == nil then
      alive[owner] = redis.call('EXISTS', p .. 'alive:' .. owner) == 1
    end
    if alive[owner] then
      sum = sum + tonumber(flat[j + 1])
    else
      redis.call('HDEL', key, owner)
    end
  end
  totals[inst] = sum
  return sum
end
local out = {}
local lease = {}
local n_req = tonumber(ARGV[i]); i = i + 1
for _ = 1, n_req do
  local policy, limit = ARGV[i], tonumber(ARGV[i + 1])
  local rl_key, rl_rate, rl_burst = ARGV[i + 2], tonumber(ARGV[i + 3]), tonumber(ARGV[i + 4])
  local n_cand = tonumber(ARGV[i + 5])
  local first = i + 6
  i = first + n_cand
  local limited = false
  if rl_key ~= '' then
    local key = p .. 'rl:' .. rl_key
    local b = redis.call('HMGET', key, 'tokens', 'ts')
    local tokens = tonumber(b[1]) or rl_burst
    local ts = tonumber(b[2]) or now_ms
    tokens = math.min(rl_burst, tokens + math.max(0, now_ms - ts) * rl_rate / 1000)
    if tokens >= 1 then
      tokens = tokens - 1
    else
      limited = true
      table.insert(out, {3, math.ceil((1 - tokens) * 1000 / rl_rate), 0})
    end
    redis.call('HSET', key, 'tokens', tostring(tokens), 'ts', now_ms)
    redis.call('PEXPIRE', key, math.ceil(rl_burst / rl_rate * 1000) + 1000)
  end
  if not limited and policy == 'none' then
    table.insert(out, {4, '', 0})  -- rate limit only; this gateway admits locally
  elseif not limited then
    local chosen, best = nil, nil
    for c = first, first + n_cand - 1 do
      local inst = ARGV[c]
      local n = total(inst)
      if n < limit then
        if policy == 'rr' then chosen = inst break end
        if best == nil or n < best then chosen, best = inst, n end
      end
    end
    if chosen then
      totals[chosen] = totals[chosen] + 1
      local key = p .. 'tasks:' .. chosen
      redis.call('HINCRBY', key, gw, 1)
      redis.call('PEXPIRE', key, task_ttl)
      if policy == 'rr' then lease[chosen] = limit end
      table.insert(out, {1, chosen, count_load(chosen, 1)})
    else
      table.insert(out, {2, '', 0})
    end
  end
end
local spares = {}
for inst, limit in pairs(lease) do
  local spare = math.min(block, math.floor((limit - totals[inst]) / 4))
  if spare > 0 then
    totals[inst] = totals[inst] + spare
    redis.call('HINCRBY', p .. 'tasks:' .. inst, gw, spare)
    table.insert(spares, inst); table.insert(spares, spare)
  end
end
return {out, spares, alerts}
"""


COUNT_LUA = """
-- ARGV: prefix, instance * n. The in-flight count of each, over live gateways.
local p = ARGV[1]
local out = {}
for i = 2, #ARGV do
  local flat = redis.call('HGETALL', p .. 'tasks:' .. ARGV[i])
  local sum = 0
  for j = 1, #flat, 2 do
    if redis.call('EXISTS', p .. 'alive:' .. flat[j]) == 1 then sum = sum + tonumber(flat[j + 1]) end
  end
  table.insert(out, sum)
end
return out
"""


class Full(Exception):
    """Every candidate instance is at the task limit."""


class RateLimited(Exception):
    def __init__(self, retry_after_s: float) -> None:
        super().__init__(f"retry after {retry_after_s:.3f}s")
        self.retry_after_s = retry_after_s


@dataclass(frozen=True, slots=True)
class RateCharge:
    """Take one token from ``key``'s bucket (``rate_per_s`` refill, ``burst`` size)."""

    key: str
    rate_per_s: float
    burst: int


@dataclass(frozen=True, slots=True)
class Admission:
    instance: str
    # Requests this instance received in the current second (all gateways, or this one
    # when Redis is down), for load alerts.
    load: int
    shared: bool


# (instance, its requests this second, counted over all gateways?)
LoadAlert = Callable[[str, int, bool], None]


@dataclass
class _Pending:
    candidates: Sequence[str]
    least_outstanding: bool
    limit: int
    charge: RateCharge | None
    future: asyncio.Future[Admission]


@dataclass
class LocalLoad:
    """Requests per instance per second, counted here (the fallback, and /status)."""

    second: int = 0
    count: int = 0
    history: deque[tuple[int, int]] = field(default_factory=lambda: deque(maxlen=10))

    def hit(self, now: float) -> int:
        sec = int(now)
        if sec != self.second:
            if self.count:
                self.history.append((self.second, self.count))
            self.second, self.count = sec, 0
        self.count += 1
        return self.count

    def recent(self, now: float) -> dict[str, float]:
        sec = int(now)
        last = self.count if self.second == sec - 1 else next((c for s, c in self.history if s == sec - 1), 0)
        window = [c for s, c in self.history if s >= sec - 10] + ([self.count] if self.second >= sec - 10 else [])
        return {"last_s": last, "avg_10s": round(sum(window) / 10, 2)}


class Limiter:
    def __init__(
        self,
        redis: aioredis.Redis | None,
        *,
        owner_ttl_ms: int,
        timeout_s: float,
        gateway_id: str | None = None,
        shared: bool = True,
        load_threshold: int = 0,
        on_load_alert: LoadAlert | None = None,
        lease_block: int = LEASE_BLOCK,
    ) -> None:
        self.redis = redis
        # shared: admissions are decided over every gateway's leases (exact across
        # gateways). Not shared: each gateway decides by its own counts (exact for itself,
        # no Redis on the hot path unless a rate limit applies), still publishing them.
        self.shared = shared
        self.gateway_id = gateway_id or uuid.uuid4().hex[:16]
        self.owner_ttl_ms = owner_ttl_ms
        self.timeout_s = timeout_s
        # Requests per second per instance past which on_load_alert is called (0: never).
        self.load_threshold = load_threshold
        self.on_load_alert = on_load_alert
        self.lease_block = lease_block
        # This gateway's in-flight requests per instance, and the slots it holds in Redis
        # (in flight + spare): what it publishes is max(held, in flight).
        self.in_flight: dict[str, int] = {}
        self.held: dict[str, int] = {}
        self.load: dict[str, LocalLoad] = {}
        self._used_at: dict[str, float] = {}
        # Spares of the last lease per instance: what a release keeps (0 near the limit).
        self._spare_cap: dict[str, int] = {}
        self._hits: dict[str, int] = {}
        self._dirty: set[str] = set()
        self._queue: list[_Pending] = []
        self._sync_requested = False
        self._sync_timer: asyncio.TimerHandle | None = None
        self._drainer: asyncio.Task[None] | None = None
        self._heartbeat: asyncio.Task[None] | None = None
        self._script = redis.register_script(ADMIT_LUA) if redis is not None else None
        self._count = redis.register_script(COUNT_LUA) if redis is not None else None
        self.redis_ok = redis is not None
        self._retry_redis_at = 0.0
        # Calls that admitted requests (the round trips requests waited for; background
        # syncs of releases, leases and load are not counted).
        self.round_trips = 0

    # -- public ----------------------------------------------------------------------
    def admit_now(
        self,
        candidates: Sequence[str],
        *,
        limit: int,
        least_outstanding: bool = False,
        charge: RateCharge | None = None,
    ) -> Admission | None:
        """An admission decided here, with no Redis call: by local counts, or on a slot
        leased already. None when it takes a call (:meth:`admit`). Raises :class:`Full`."""
        if (
            self._script is None
            or (not self.shared and charge is None)
            or (not self.redis_ok and time.monotonic() < self._retry_redis_at)
        ):
            return self._admit_locally(candidates, limit, least_outstanding)
        if charge is None and not least_outstanding and candidates and self.redis_ok:
            return self._admit_leased(candidates[0], limit)
        return None

    async def admit(
        self,
        candidates: Sequence[str],
        *,
        limit: int,
        least_outstanding: bool = False,
        charge: RateCharge | None = None,
    ) -> Admission:
        """Choose the first (round robin) or least loaded candidate under ``limit``.

        Raises :class:`Full` or :class:`RateLimited`. The caller must :meth:`release`
        the returned admission's instance when the request is over.
        """
        admission = self.admit_now(candidates, limit=limit, least_outstanding=least_outstanding, charge=charge)
        if admission is not None:
            return admission
        future: asyncio.Future[Admission] = asyncio.get_running_loop().create_future()
        self._queue.append(_Pending(candidates, least_outstanding, limit, charge, future))
        self._kick()
        return await future

    def release(self, instance: str) -> None:
        n = self.in_flight.get(instance, 0) - 1
        if n > 0:
            self.in_flight[instance] = n
        else:
            self.in_flight.pop(instance, None)
        keep = max(n, 0) + self._spare_cap.get(instance, 0)
        if self.held.get(instance, 0) > keep:
            self._hold(instance, keep)
        elif not self.shared:
            self._dirty.add(instance)
        # Other gateways learn of the release with the next call; when no request comes to
        # carry it, a sync shortly after does (coalescing many releases). Spares kept go
        # back once idle.
        self._sync_soon(RELEASE_SYNC_DELAY_S if self._dirty else LEASE_IDLE_S)

    def start(self, heartbeat_s: float | None = None) -> None:
        if self._script is not None:
            interval = heartbeat_s if heartbeat_s is not None else self.owner_ttl_ms / 3000
            self._heartbeat = asyncio.create_task(self._beat(interval))

    async def stop(self) -> None:
        """Publish the final counts (zero after a drained shutdown) and give up ownership,
        so another gateway need not wait for the TTL to see these slots free."""
        if self._sync_timer is not None:
            self._sync_timer.cancel()
        await cancel_and_wait(self._heartbeat)
        if self._script is not None and self.redis_ok:
            self._dirty |= set(self.load) | set(self.in_flight)
            try:
                await asyncio.wait_for(self.flush(), self.timeout_s * 2)
                if not self.in_flight and self.redis is not None:
                    await self.redis.delete(PREFIX + "alive:" + self.gateway_id)
            except (RedisError, OSError, TimeoutError) as e:
                log.warning("could not release this gateway's task counts (%s); they expire with its TTL", e)
        await cancel_and_wait(self._drainer)

    async def shared_counts(self, instances: Sequence[str]) -> dict[str, int] | None:
        """Slots held per instance over every live gateway (in flight and leased spares;
        for /status), or None while Redis is unreachable. Off the hot path."""
        if self._count is None or not self.redis_ok or not instances:
            return None
        try:
            counts = await asyncio.wait_for(self._count(keys=[], args=[PREFIX, *instances]), self.timeout_s)
        except (RedisError, OSError, TimeoutError):
            return None
        return {inst: int(n) for inst, n in zip(instances, counts)}

    def local_load(self, instance: str) -> LocalLoad:
        ll = self.load.get(instance)
        if ll is None:
            ll = self.load[instance] = LocalLoad()
        return ll

    # -- local -----------------------------------------------------------------------
    def _take(self, instance: str) -> int:
        self.in_flight[instance] = self.in_flight.get(instance, 0) + 1
        return self.local_load(instance).hit(time.time())

    def _admit_leased(self, instance: str, limit: int) -> Admission | None:
        """On a slot this gateway leased already (no round trip), or None."""
        n = self.in_flight.get(instance, 0)
        if n >= min(limit, self.held.get(instance, 0)):
            return None
        load = self._take(instance)
        self._used_at[instance] = time.monotonic()
        self._hits[instance] = self._hits.get(instance, 0) + 1
        self._sync_soon(LOAD_SYNC_S)
        return Admission(instance, load, shared=True)

    def _admit_locally(self, candidates: Sequence[str], limit: int, least_outstanding: bool) -> Admission:
        chosen: str | None = None
        best = limit
        for inst in candidates:
            n = self.in_flight.get(inst, 0)
            if n < limit:
                if not least_outstanding:
                    chosen = inst
                    break
                if n < best:
                    chosen, best = inst, n
        if chosen is None:
            raise Full()
        load = self._take(chosen)
        if self.load_threshold and load == self.load_threshold + 1:
            self._alert(chosen, load, shared=False)
        return Admission(chosen, load, shared=False)

    def _alert(self, instance: str, load: int, *, shared: bool) -> None:
        if self.on_load_alert is not None:
            self.on_load_alert(instance, load, shared)

    # -- leases ----------------------------------------------------------------------
    def _slots(self, instance: str) -> int:
        """What this gateway publishes for ``instance``: never less than it has in flight
        (admissions made locally while Redis was down count too)."""
        return max(self.held.get(instance, 0), self.in_flight.get(instance, 0))

    def _trim(self, everything: bool) -> None:
        """Give back spares beyond the last lease's, those of instances unused for
        LEASE_IDLE_S, and (``everything``) all of them."""
        idle_before = time.monotonic() - LEASE_IDLE_S
        for inst, held in list(self.held.items()):
            n = self.in_flight.get(inst, 0)
            idle = everything or self._used_at.get(inst, 0.0) < idle_before
            keep = n if idle else n + self._spare_cap.get(inst, 0)
            if held > keep:
                self._hold(inst, keep)

    def _hold(self, instance: str, slots: int) -> None:
        """Keep only ``slots`` of ``instance`` (the rest goes back with the next call)."""
        self._dirty.add(instance)
        if slots:
            self.held[instance] = slots
        else:
            self.held.pop(instance, None)

    # -- Redis -----------------------------------------------------------------------
    def _sync_soon(self, delay: float) -> None:
        if self._script is not None and self._sync_timer is None:
            self._sync_timer = asyncio.get_running_loop().call_later(delay, self._timed_sync)

    def _timed_sync(self) -> None:
        self._sync_timer = None
        if self.redis_ok or time.monotonic() >= self._retry_redis_at:
            self._trim(everything=False)
            if self._dirty or self._hits:
                self._sync_requested = True
                self._kick()
        if any(self.in_flight.get(i, 0) < h for i, h in self.held.items()):
            # Spares held: look again once they may have gone idle.
            self._sync_soon(LEASE_IDLE_S)

    def _own_counts(self, batch: list[_Pending]) -> list[str | int]:
        """Absolute counts of this gateway for every instance the call touches or released,
        and the load of requests admitted on leases since the last call."""
        names = set(self._dirty)
        for p in batch:
            names.update(p.candidates)
        self._dirty.clear()
        args: list[str | int] = [len(names)]
        for name in names:
            args += [name, self._slots(name)]
        hits, self._hits = self._hits, {}
        args.append(len(hits))
        for name, n in hits.items():
            args += [name, n]
        return args

    async def _call(self, batch: list[_Pending]) -> list:
        assert self._script is not None
        dirty_before, hits_before = set(self._dirty), dict(self._hits)
        args: list[str | int | float] = [
            PREFIX,
            self.gateway_id,
            self.owner_ttl_ms,
            self.load_threshold or 2**62,
            self.lease_block,
        ]
        args += self._own_counts(batch)
        args.append(len(batch))
        for p in batch:
            c = p.charge
            policy = ("lo" if p.least_outstanding else "rr") if self.shared else "none"
            args += [
                policy,
                p.limit,
                c.key if c else "",
                c.rate_per_s if c else 0,
                c.burst if c else 0,
                len(p.candidates),
            ]
            args += list(p.candidates)
        try:
            self.round_trips += 1 if batch else 0
            async with asyncio.timeout(self.timeout_s):
                result = await self._script(keys=[], args=args)
        except (RedisError, OSError, TimeoutError) as e:
            # Whatever did not reach Redis is published on the next successful call.
            self._dirty |= dirty_before | {n for p in batch for n in p.candidates}
            for name, n in hits_before.items():
                self._hits[name] = self._hits.get(name, 0) + n
            self._mark_down(e)
            raise
        self._mark_up()
        return result

    def _kick(self) -> None:
        if self._drainer is None:
            self._drainer = asyncio.create_task(self._drain())

    async def _drain(self) -> None:
        """The only sender: calls go strictly one after another, which keeps the absolute
        counts each call writes in order with the admissions it makes."""
        try:
            while self._queue or self._sync_requested:
                batch, self._queue = self._queue, []
                self._sync_requested = False
                try:
                    answers, spares, alerts = await self._call(batch)
                except (RedisError, OSError, TimeoutError):
                    for p in batch:
                        self._settle_locally(p)
                    continue
                leased = dict(_pairs(spares))
                for inst, n in leased.items():
                    self.held[inst] = self.held.get(inst, 0) + n
                for p, (code, value, load) in zip(batch, answers):
                    self._settle(p, int(code), _s(value), int(load))
                    if code == 1:
                        self._spare_cap[_s(value)] = leased.get(_s(value), 0)
                for inst, load in _pairs(alerts):
                    self._alert(inst, int(load), shared=True)
        finally:
            self._drainer = None

    def _settle(self, p: _Pending, code: int, value: str, load: int) -> None:
        if code == 1:
            # Held even when the request gave up (deadline) while the call was out: then
            # it is a spare, given back as spares are.
            self.held[value] = self.held.get(value, 0) + 1
        if p.future.done():
            return
        if code == 1:
            self._take(value)
            self._used_at[value] = time.monotonic()
            p.future.set_result(Admission(value, load, shared=True))
        elif code == 2:
            p.future.set_exception(Full())
        elif code == 4:
            self._settle_locally(p)
        else:
            p.future.set_exception(RateLimited(int(value) / 1000))

    def _settle_locally(self, p: _Pending) -> None:
        if p.future.done():
            return
        try:
            p.future.set_result(self._admit_locally(p.candidates, p.limit, p.least_outstanding))
        except Full as e:
            p.future.set_exception(e)

    def _mark_down(self, e: BaseException) -> None:
        # Do not try Redis on every request while it is down: once per short interval.
        self._retry_redis_at = time.monotonic() + 0.5
        if self.redis_ok:
            self.redis_ok = False
            log.error(
                "Redis unavailable (%s): task limits are now local to this gateway and rate limiting fails open",
                e or type(e).__name__,
                extra={"event.kind": "alert", "event.action": "limiter-degraded"},
            )

    def _mark_up(self) -> None:
        if not self.redis_ok:
            self.redis_ok = True
            log.warning(
                "Redis reachable again: task limits are shared and rate limiting is on",
                extra={"event.action": "limiter-restored"},
            )

    async def _beat(self, interval_s: float) -> None:
        """Keep this gateway's ownership alive and publish releases that no request carried."""
        while True:
            await asyncio.sleep(interval_s)
            if not self.redis_ok and time.monotonic() < self._retry_redis_at:
                continue
            # Republish every count we hold, so a Redis that restarted empty learns them.
            self._trim(everything=False)
            self._dirty |= set(self.in_flight) | set(self.held)
            self._sync_requested = True
            self._kick()

    async def flush(self) -> None:
        """Give back every spare slot and publish pending releases now, and wait for it
        (tests, shutdown)."""
        if self._script is None:
            return
        self._trim(everything=True)
        self._sync_requested = True
        self._kick()
        while self._drainer is not None:
            await asyncio.sleep(0.002)


def _s(v: bytes | str) -> str:
    return v.decode() if isinstance(v, bytes) else v


def _pairs(flat: list) -> list[tuple[str, int]]:
    return [(_s(flat[k]), int(flat[k + 1])) for k in range(0, len(flat), 2)]
