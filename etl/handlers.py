"""HTTP handlers: thin wrappers over etl.pipeline, etl.runs and etl.analytics."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import psycopg
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from tornado.web import StaticFileHandler

from common.errors import Forbidden, NotFound
from common.handler import BaseHandler
from etl import analytics, metrics, pipeline, runs
from etl.scheduler import Scheduler

STATIC_DIR = Path(__file__).parent / "static"


class EtlHandler(BaseHandler):
    def initialize(self, ctx: pipeline.Context, scheduler: Scheduler) -> None:
        self.ctx = ctx
        self.scheduler = scheduler

    async def on_primary(self, fn: Any) -> Any:
        """Run records are read on the primary: a run's state must never look older than
        the 202 that announced it."""
        conn = await pipeline.connect_warehouse(self.ctx)
        try:
            return await fn(conn)
        except psycopg.OperationalError as e:
            raise pipeline.WarehouseUnavailable("the warehouse primary is unavailable") from e
        finally:
            await conn.close()


class RunsHandler(EtlHandler):
    async def post(self) -> None:
        self.require_user("admin")
        full = self.get_query_argument("full_refresh", "0") in ("1", "true", "yes")
        run = await pipeline.begin(self.ctx, full_refresh=full)  # 409 when another run holds the lock
        self.scheduler.spawn(run)
        self.set_header("Location", f"/etl/runs/{run.run_id}")
        self.write_json({"run_id": run.run_id}, status=202)

    async def get(self) -> None:
        self.require_user("admin")
        limit = self.query_int("limit", 20, minimum=1, maximum=500)
        offset = self.query_int("offset", 0, minimum=0)
        self.write_json({"runs": await self.on_primary(lambda conn: runs.recent(conn, limit, offset))})


class RunHandler(EtlHandler):
    async def get(self, run_id: str) -> None:
        self.require_user("admin")
        record = await self.on_primary(lambda conn: runs.get(conn, int(run_id)))
        if record is None:
            raise NotFound(f"no run {run_id}")
        self.write_json(record)


class LeaderboardHandler(EtlHandler):
    async def get(self) -> None:
        self.require_user("admin")
        period = analytics.parse_period(self.get_query_argument("from", None), self.get_query_argument("to", None))
        sort, order = analytics.parse_sort(self.get_query_argument("sort", None),
                                           self.get_query_argument("order", None))
        limit = self.query_int("limit", 50, minimum=1, maximum=1000)
        offset = self.query_int("offset", 0, minimum=0)
        self.write_json(await analytics.leaderboard(self.ctx.warehouse, period, sort, order, limit, offset))


class DailyHandler(EtlHandler):
    async def get(self, barber_id: str) -> None:
        claims = self.require_user("admin", "employee")
        if claims.user_type == "employee" and claims.user_id != int(barber_id):
            raise Forbidden("a barber may only read their own analytics")
        period = analytics.parse_period(self.get_query_argument("from", None), self.get_query_argument("to", None))
        self.write_json(await analytics.daily(self.ctx.warehouse, int(barber_id), period))


class DashboardHandler(BaseHandler):
    """The page holds no data (its script signs in and calls the API), so it is public."""

    def get(self) -> None:
        self.set_header("Content-Type", "text/html; charset=UTF-8")
        self.set_header("Cache-Control", "no-cache")
        self.finish((STATIC_DIR / "dashboard.html").read_bytes())


class StatusHandler(EtlHandler):
    async def get(self) -> None:
        try:
            mongo_ok = await asyncio.wait_for(self.ctx.chat.ping(), 1.0)
        except TimeoutError:
            mongo_ok = False
        warehouse = self.ctx.warehouse.view()
        self.write_json({
            "status": "ok" if mongo_ok and warehouse["primary"]["healthy"] else "degraded",
            "service": "etl",
            "instance": self.ctx.instance,
            "mongo": "ok" if mongo_ok else "unavailable",
            "warehouse": warehouse,
            "authen_database": self.ctx.users.router.view(),
            "schedule": {"interval_s": self.ctx.settings.etl_interval_s,
                         "consecutive_failures": self.scheduler.failures},
        })


class MetricsHandler(BaseHandler):
    def get(self) -> None:
        self.set_header("Content-Type", CONTENT_TYPE_LATEST)
        self.finish(generate_latest(metrics.REGISTRY))


def routes(ctx: pipeline.Context, scheduler: Scheduler) -> list[tuple[Any, ...]]:
    args = {"ctx": ctx, "scheduler": scheduler}
    return [
        (r"/runs", RunsHandler, args),
        (r"/runs/([0-9]{1,18})", RunHandler, args),
        (r"/analytics/barbers", LeaderboardHandler, args),
        (r"/analytics/barbers/([0-9]{1,18})/daily", DailyHandler, args),
        (r"/dashboard", DashboardHandler),
        (r"/static/(.*)", StaticFileHandler, {"path": str(STATIC_DIR)}),
        (r"/utilities/status", StatusHandler, args),
        (r"/metrics", MetricsHandler),
    ]
