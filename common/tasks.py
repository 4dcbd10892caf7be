"""Background tasks: the one way services stop them."""

from __future__ import annotations

import asyncio
from typing import Any


async def cancel_and_wait(*tasks: "asyncio.Future[Any] | None") -> None:
    """Cancel background tasks and wait until they have finished; their own errors (and
    cancellations) end with them, not in the caller that stops them."""
    live = [t for t in tasks if t is not None]
    for task in live:
        task.cancel()
    await asyncio.gather(*live, return_exceptions=True)
