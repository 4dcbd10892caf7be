"""Brute-force guard for sign-in, shared by every instance through Redis.

Two counters per window (``AUTHEN_SIGNIN_WINDOW_S``, starting at the first attempt):

* per (case-folded username, client address): every attempt first takes one of the
  window's ``max_failures`` slots, atomically, before the password is checked; a failure
  keeps its slot, a success clears it. That client gets 429 for the username once its
  slots are gone, so parallel guesses cannot slip past the count. Other clients (the
  owner, signing in from elsewhere) are not affected: usernames are public, and a
  per-username lock-out would let anyone lock anyone out.
* per username, across clients: failures (attempts minus successes). Past
  ``slow_after`` of them every attempt at the username waits before its password is
  checked, longer with each further failure up to ``max_delay_s``. This slows a guesser
  spread over many addresses without ever refusing the owner's right password.

The client address is the peer's, or the gateway's X-Forwarded-For entry when the peer
is a trusted proxy (common.handler.client_address): a client cannot choose it.
When Redis is down the guard fails open (sign-in keeps working) and says so in the log.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from redis.asyncio import Redis
from redis.exceptions import RedisError

from common.errors import TooManyRequests

log = logging.getLogger("barber.authen.guard")

# Take a slot for this client if one is free (starting its window on the first) and count
# the attempt for the username, else report the time left: one round trip, atomic, and
# never a key without an expiry.
_RESERVE_SCRIPT = """
local n = tonumber(redis.call('GET', KEYS[1]) or '0')
if n >= tonumber(ARGV[1]) then
  return {0, redis.call('PTTL', KEYS[1]), 0}
end
n = redis.call('INCR', KEYS[1])
if n == 1 then redis.call('PEXPIRE', KEYS[1], ARGV[2]) end
local g = redis.call('INCR', KEYS[2])
if g == 1 then redis.call('PEXPIRE', KEYS[2], ARGV[2]) end
return {n, 0, g}
"""

# A success: this client's slots are free again, and the attempt is no failure.
_SUCCESS_SCRIPT = """
redis.call('DEL', KEYS[1])
if redis.call('EXISTS', KEYS[2]) == 1 and tonumber(redis.call('GET', KEYS[2])) > 0 then
  redis.call('DECR', KEYS[2])
end
return 1
"""


@dataclass(frozen=True, slots=True)
class Attempt:
    # This client's attempts at the username in the window, this one included.
    client_attempts: int
    # Failed (or still running) attempts at the username from every client.
    username_attempts: int
    # How long to wait before checking the password.
    delay_s: float


def progressive_delay(username_attempts: int, slow_after: int, max_delay_s: float) -> float:
    """0 up to ``slow_after`` attempts, then 0.1 s more per attempt, at most ``max_delay_s``."""
    return min(max_delay_s, 0.1 * max(0, username_attempts - slow_after))


class SigninGuard:
    def __init__(
        self,
        redis: Redis,
        *,
        max_failures: int,
        window_s: int,
        slow_after: int = 20,
        max_delay_s: float = 2.0,
        prefix: str = "authen:signin:",
    ) -> None:
        self._redis = redis
        self.max_failures = max_failures
        self.window_s = window_s
        self.slow_after = slow_after
        self.max_delay_s = max_delay_s
        self._prefix = prefix
        self._reserve = redis.register_script(_RESERVE_SCRIPT)
        self._success = redis.register_script(_SUCCESS_SCRIPT)

    def _keys(self, username: str, client: str) -> list[str]:
        name = username.casefold()
        return [f"{self._prefix}client:{name}\n{client}", f"{self._prefix}user:{name}"]

    async def attempt(self, username: str, client: str) -> Attempt | None:
        """Take a slot for one attempt (None: Redis down, failing open). Raises 429 when
        this client has no slot left for the username."""
        try:
            taken, ttl_ms, total = await self._reserve(
                keys=self._keys(username, client), args=[self.max_failures, self.window_s * 1000]
            )
        except RedisError as e:
            log.warning("sign-in guard unavailable (%s): failing open", e)
            return None
        if int(taken) == 0:
            retry_after = int(ttl_ms) / 1000 if int(ttl_ms) > 0 else self.window_s
            raise TooManyRequests(
                "too many failed sign-ins for this username from this client; try again later",
                retry_after_s=retry_after,
            )
        return Attempt(int(taken), int(total), progressive_delay(int(total), self.slow_after, self.max_delay_s))

    async def succeeded(self, username: str, client: str) -> None:
        try:
            await self._success(keys=self._keys(username, client))
        except RedisError as e:
            log.warning("sign-in guard unavailable (%s): failures not reset", e)
