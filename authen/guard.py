"""Brute-force guard for sign-in, shared by every instance through Redis.

Every sign-in attempt for a (case-folded) username first takes one of the window's
``max_failures`` slots, atomically, before the password is checked; a failure keeps its
slot, a success clears the window. So parallel guesses cannot slip past the count: at
most ``max_failures`` guesses are checked per window, however many arrive at once. The
window starts at the first attempt; when it is full the username gets 429 until it ends.
When Redis is down the guard fails open (sign-in keeps working) and says so in the log.
"""

from __future__ import annotations

import logging

from redis.asyncio import Redis
from redis.exceptions import RedisError

from common.errors import TooManyRequests

log = logging.getLogger("barber.authen.guard")

# Take a slot if one is free (starting the window on the first), else report the time
# left: one round trip, atomic, and never a key without an expiry.
_RESERVE_SCRIPT = """
local n = tonumber(redis.call('GET', KEYS[1]) or '0')
if n >= tonumber(ARGV[1]) then
  return {0, redis.call('PTTL', KEYS[1])}
end
n = redis.call('INCR', KEYS[1])
if n == 1 then redis.call('PEXPIRE', KEYS[1], ARGV[2]) end
return {n, 0}
"""


class SigninGuard:
    def __init__(self, redis: Redis, *, max_failures: int, window_s: int, prefix: str = "authen:signin_failures:") -> None:
        self._redis = redis
        self.max_failures = max_failures
        self.window_s = window_s
        self._prefix = prefix
        self._reserve = redis.register_script(_RESERVE_SCRIPT)

    def _key(self, username: str) -> str:
        return self._prefix + username.casefold()

    async def attempt(self, username: str) -> int | None:
        """Take a slot for one attempt; returns attempts in the window so far (None: Redis
        down, failing open). Raises 429 when the username is locked out."""
        try:
            taken, ttl_ms = await self._reserve(keys=[self._key(username)],
                                                args=[self.max_failures, self.window_s * 1000])
        except RedisError as e:
            log.warning("sign-in guard unavailable (%s): failing open", e)
            return None
        if int(taken) == 0:
            retry_after = int(ttl_ms) / 1000 if int(ttl_ms) > 0 else self.window_s
            raise TooManyRequests(
                "too many failed sign-ins for this username; try again later", retry_after_s=retry_after
            )
        return int(taken)

    async def succeeded(self, username: str) -> None:
        try:
            await self._redis.delete(self._key(username))
        except RedisError as e:
            log.warning("sign-in guard unavailable (%s): failures not reset", e)
