"""Brute-force guard for sign-in, shared by every instance through Redis.

Failures are counted per (case-folded) username in a fixed window that starts at the
first failure; at the limit the username is refused with 429 until the window ends.
When Redis is down the guard fails open (sign-in keeps working) and says so in the log.
"""

from __future__ import annotations

import logging

from redis.asyncio import Redis
from redis.exceptions import RedisError

from common.errors import TooManyRequests

log = logging.getLogger("barber.authen.guard")

# INCR, and start the window on the first failure only (atomic, so it never leaks a key
# without expiry).
_FAIL_SCRIPT = """
local n = redis.call('INCR', KEYS[1])
if n == 1 then redis.call('PEXPIRE', KEYS[1], ARGV[1]) end
return n
"""


class SigninGuard:
    def __init__(self, redis: Redis, *, max_failures: int, window_s: int, prefix: str = "authen:signin_failures:") -> None:
        self._redis = redis
        self.max_failures = max_failures
        self.window_s = window_s
        self._prefix = prefix
        self._fail = redis.register_script(_FAIL_SCRIPT)

    def _key(self, username: str) -> str:
        return self._prefix + username.casefold()

    async def check(self, username: str) -> None:
        """Raise 429 when ``username`` is locked out."""
        try:
            async with self._redis.pipeline(transaction=False) as pipe:
                pipe.get(self._key(username))
                pipe.pttl(self._key(username))
                count, ttl_ms = await pipe.execute()
        except RedisError as e:
            log.warning("sign-in guard unavailable (%s): failing open", e)
            return
        if count is not None and int(count) >= self.max_failures:
            retry_after = max(ttl_ms, 0) / 1000 if ttl_ms and ttl_ms > 0 else self.window_s
            raise TooManyRequests(
                "too many failed sign-ins for this username; try again later", retry_after_s=retry_after
            )

    async def failed(self, username: str) -> int | None:
        """Count one failure; returns the count so far (None if Redis is down)."""
        try:
            return int(await self._fail(keys=[self._key(username)], args=[self.window_s * 1000]))
        except RedisError as e:
            log.warning("sign-in guard unavailable (%s): failure not counted", e)
            return None

    async def succeeded(self, username: str) -> None:
        try:
            await self._redis.delete(self._key(username))
        except RedisError as e:
            log.warning("sign-in guard unavailable (%s): failures not reset", e)
