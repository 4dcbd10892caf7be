"""The in-service schedule: one incremental run every ``ETL_INTERVAL_S``; a failed run
is retried sooner, with jittered exponential backoff from ``ETL_RETRY_MIN_S`` up to the
interval. A run already in progress elsewhere (another instance, a terminal) is skipped."""

from __future__ import annotations

import asyncio
import logging

from common.tasks import backoff_delay, cancel_and_wait
from etl import pipeline
from etl.runs import RunInProgress

log = logging.getLogger("barber.etl.scheduler")


def next_delay(failures: int, interval_s: float, retry_min_s: float) -> float:
    if failures == 0:
        return interval_s
    return backoff_delay(failures - 1, cap=interval_s, base=retry_min_s, jitter=0.2)


class Scheduler:
    def __init__(self, ctx: pipeline.Context) -> None:
        self.ctx = ctx
        self.failures = 0
        self._task: asyncio.Task[None] | None = None
        # Runs started through the API, so a stop can wait for them.
        self.background: set[asyncio.Task[object]] = set()

    def start(self) -> None:
        self._task = asyncio.create_task(self._loop(), name="etl-scheduler")

    async def stop(self) -> None:
        await cancel_and_wait(self._task, *self.background)

    def spawn(self, run: pipeline.Run) -> None:
        """Carry out a run begun by a request, in the background."""
        task = asyncio.create_task(self._execute(run), name=f"etl-run-{run.run_id}")
        self.background.add(task)
        task.add_done_callback(self.background.discard)

    async def _execute(self, run: pipeline.Run) -> bool:
        try:
            await pipeline.execute(self.ctx, run)
            return True
        except pipeline.RunFailed:
            return False  # logged and recorded by the pipeline

    async def _loop(self) -> None:
        s = self.ctx.settings
        while True:
            await asyncio.sleep(next_delay(self.failures, s.etl_interval_s, s.etl_retry_min_s))
            try:
                run = await pipeline.begin(self.ctx, full_refresh=False)
            except RunInProgress:
                log.info("scheduled run skipped: another run is in progress")
                continue
            except pipeline.WarehouseUnavailable as e:
                self.failures += 1
                log.error("scheduled run could not start: %s", e.detail)
                continue
            except Exception:  # the schedule must survive anything; the next round retries
                self.failures += 1
                log.exception("scheduled run could not start")
                continue
            ok = await self._execute(run)
            self.failures = 0 if ok else self.failures + 1
