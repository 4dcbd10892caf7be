"""Background tasks: the one way services stop them."""

from __future__ import annotations

import asyncio
import random
from typing import Any


def backoff_delay(attempt: int, cap: float = 2.0, base: float = 0.05) -> float:
    """How long to wait before retry number ``attempt``: doubling from ``base`` up to
    ``cap``, with jitter so that many waiters do not retry in step."""
    return random.uniform(0.5, 1.0) * min(cap, base * 2**attempt)


async def cancel_and_wait(*tasks: "asyncio.Future[Any] | None") -> None:
    """Cancel background tasks and wait until they have finished; their own errors (and
    cancellations) end with them, not in the caller that stops them."""
    live = [t for t in tasks if t is not None]
    for task in live:
        task.cancel()
    await asyncio.gather(*live, return_exceptions=True)
