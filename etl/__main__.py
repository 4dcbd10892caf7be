"""``python -m etl`` serves (the API and the schedule); ``migrate`` applies the warehouse
migrations; ``run [--full-refresh]`` carries out one run from a terminal, with a
progress line per phase on stderr, and exits non-zero when it fails."""

from __future__ import annotations

import argparse
import asyncio
import socket
import sys
import time
from typing import TextIO

from common.config import load_settings_or_exit
from etl.settings import EtlSettings

# Exit codes of `run`.
FAILED = 1
BUSY = 3


def _migrate(settings: EtlSettings) -> int:
    from common.migrations import migrate_command
    from etl.migrations import upgrade

    return migrate_command("etl", upgrade, settings.warehouse_database_url, "WAREHOUSE_DATABASE_URL")


class ProgressLine:
    """One line per phase on stderr, rewritten in place (at most ~10 times a second)."""

    def __init__(self, stream: TextIO = sys.stderr) -> None:
        self.stream = stream
        self.counts: dict[str, int] = {}
        self.started = time.monotonic()
        self._shown = 0.0

    def __call__(self, phase: str, n: int) -> None:
        self.counts[phase] = n
        now = time.monotonic()
        if now - self._shown >= 0.1:
            self._shown = now
            self._draw(end="\r")

    def _draw(self, end: str) -> None:
        elapsed = max(time.monotonic() - self.started, 1e-9)
        parts = [f"{phase} {n:,} ({n / elapsed:,.0f}/s)" for phase, n in self.counts.items()]
        print(f"etl run: {' | '.join(parts)}  [{elapsed:.1f}s]\033[K", end=end, file=self.stream, flush=True)

    def close(self) -> None:
        self._draw(end="\n")


async def _run(settings: EtlSettings, full_refresh: bool) -> int:
    from etl import pipeline
    from etl.app import close_context, make_context, make_redis, start_context
    from etl.runs import RunInProgress

    redis = make_redis(settings.redis_url)
    ctx = make_context(settings, redis, f"{socket.gethostname()}:cli")
    progress = ProgressLine()
    try:
        await start_context(ctx)
        try:
            run = await pipeline.begin(ctx, full_refresh=full_refresh)
        except RunInProgress:
            print("etl run: another run is in progress; nothing done", file=sys.stderr)
            return BUSY
        except pipeline.WarehouseUnavailable as e:
            print(f"etl run: {e.detail}", file=sys.stderr)
            return FAILED
        print(f"etl run: run {run.run_id} ({run.mode})", file=sys.stderr)
        try:
            record = await pipeline.execute(ctx, run, progress)
        except pipeline.RunFailed as e:
            progress.close()
            print(f"etl run: run {e.run_id} failed: {e.error}", file=sys.stderr)
            return FAILED
        progress.close()
        es = record["elasticsearch"]
        print(
            f"etl run: run {record['run_id']} succeeded: {record['rows']}"
            + (f"; elasticsearch: {es}" if settings.elasticsearch_url else ""),
            file=sys.stderr,
        )
        return 0
    finally:
        await close_context(ctx)
        await redis.aclose()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m etl", description=__doc__)
    sub = parser.add_subparsers(dest="command")
    sub.add_parser("serve", help="serve HTTP and run the schedule (the default)")
    sub.add_parser("migrate", help="apply the warehouse migrations (alembic upgrade head)")
    run = sub.add_parser("run", help="carry out one run now")
    run.add_argument("--full-refresh", action="store_true", help="rebuild the warehouse from all the source data")
    args = parser.parse_args(argv)

    settings = load_settings_or_exit(EtlSettings)
    if args.command == "migrate":
        return _migrate(settings)
    if args.command == "run":
        from common.logs import setup_logging

        setup_logging("etl", settings.log_level, instance=f"{socket.gethostname()}:cli")
        return asyncio.run(_run(settings, args.full_refresh))

    from common.service import run as serve
    from etl.app import build

    serve(settings, "etl", build)
    return 0


if __name__ == "__main__":
    sys.exit(main())
