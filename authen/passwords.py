"""argon2id password hashing, off the event loop.

Hashing is deliberately slow and CPU-bound; it runs on a small thread pool (argon2's C
code releases the GIL) so one instance keeps answering other requests meanwhile.
"""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor

from argon2 import PasswordHasher, Type
from argon2.exceptions import InvalidHashError, VerificationError, VerifyMismatchError


class Passwords:
    def __init__(self, *, time_cost: int, memory_kib: int, parallelism: int, threads: int) -> None:
        self._hasher = PasswordHasher(
            time_cost=time_cost, memory_cost=memory_kib, parallelism=parallelism, type=Type.ID
        )
        self._pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="argon2")
        # Verified against when the user does not exist, so that answer takes as long.
        self._dummy = self._hasher.hash("no such user: timing equaliser")

    @property
    def parameters(self) -> dict[str, int]:
        h = self._hasher
        return {"time_cost": h.time_cost, "memory_kib": h.memory_cost, "parallelism": h.parallelism}

    async def hash(self, password: str) -> str:
        return await asyncio.get_running_loop().run_in_executor(self._pool, self._hasher.hash, password)

    def _verify(self, stored: str | None, password: str) -> bool:
        try:
            return self._hasher.verify(stored or self._dummy, password) and stored is not None
        except (VerifyMismatchError, VerificationError, InvalidHashError):
            return False

    async def verify(self, stored: str | None, password: str) -> bool:
        """True if ``password`` matches ``stored``; ``None`` (no such user) costs the same and fails."""
        return await asyncio.get_running_loop().run_in_executor(self._pool, self._verify, stored, password)

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
