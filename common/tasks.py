"""Background tasks: the one way services stop them."""

from __future__ import annotations

import asyncio
import random
from typing import Any


def backoff_delay(attempt: int, cap: float = 2.0, base: float = 0.05, jitter: float = 0.5) -> float:
    """How long to wait before retry number ``attempt``: doubling from ``base`` up to
    ``cap``, less up to ``jitter`` of it at random so that many waiters do not retry in
    step (``jitter=0``: exactly the doubled delay)."""
    return random.uniform(1.0 - jitter, 1.0) * min(cap, base * 2.0**attempt)


async def cancel_and_wait(*tasks: asyncio.Future[Any] | None) -> None:
    """Cancel background tasks and wait until they have finished; their own errors (and
    cancellations) end with them, not in the caller that stops them."""
    live = [t for t in tasks if t is not None]
    for task in live:
        task.cancel()
    await asyncio.gather(*live, return_exceptions=True)
