"""argon2id password hashing, off the event loop.

Hashing is deliberately slow and CPU-bound; it runs on a small thread pool (argon2's C
code releases the GIL) so one instance keeps answering other requests meanwhile. The
queue in front of the pool is bounded (``AUTHEN_HASH_QUEUE_MAX`` jobs running or
waiting): past it a sign-up or sign-in is refused at once with a 503 marked as a
dependency refusal, instead of waiting behind minutes of queued hashes while holding
one of the gateway's task slots.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

from argon2 import PasswordHasher, Type
from argon2.exceptions import InvalidHashError, VerificationError, VerifyMismatchError

from common.errors import DependencyUnavailable

T = TypeVar("T")


class HashingBusy(DependencyUnavailable):
    """Every hashing slot is taken: shed this request (503, try again shortly)."""

    dependency = "password-hashing"

    def __init__(self) -> None:
        super().__init__("too many sign-ups and sign-ins in progress; try again shortly", headers={"Retry-After": "1"})


class Passwords:
    def __init__(
        self, *, time_cost: int, memory_kib: int, parallelism: int, threads: int, max_pending: int = 1_000_000
    ) -> None:
        self._hasher = PasswordHasher(
            time_cost=time_cost, memory_cost=memory_kib, parallelism=parallelism, type=Type.ID
        )
        self._pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="argon2")
        self.max_pending = max_pending
        self.pending = 0
        self.shed = 0
        self.hashed = 0
        # Verified against when the user does not exist, so that answer takes as long.
        self._dummy = self._hasher.hash("no such user: timing equaliser")

    @property
    def parameters(self) -> dict[str, int]:
        h = self._hasher
        return {"time_cost": h.time_cost, "memory_kib": h.memory_cost, "parallelism": h.parallelism}

    async def _run(self, fn: Callable[..., T], *args: Any) -> T:
        if self.pending >= self.max_pending:
            self.shed += 1
            raise HashingBusy()
        self.pending += 1
        try:
            return await asyncio.get_running_loop().run_in_executor(self._pool, fn, *args)
        finally:
            self.pending -= 1

    async def hash(self, password: str) -> str:
        """Raises HashingBusy when the queue is full."""
        digest = await self._run(self._hasher.hash, password)
        self.hashed += 1
        return digest

    def _verify(self, stored: str | None, password: str) -> bool:
        try:
            return self._hasher.verify(stored or self._dummy, password) and stored is not None
        except (VerifyMismatchError, VerificationError, InvalidHashError):
            return False

    async def verify(self, stored: str | None, password: str) -> bool:
        """True if ``password`` matches ``stored``; ``None`` (no such user) costs the same and fails."""
        return await self._run(self._verify, stored, password)

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
