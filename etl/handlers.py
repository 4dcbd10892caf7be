"""HTTP handlers: thin wrappers over etl.pipeline, etl.runs and etl.analytics."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import psycopg
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from tornado.web import StaticFileHandler

from common.errors import Forbidden, NotFound
from common.handler import CONTEXT, BaseHandler
from common.openapi import TEXT_PLAIN, StatusBody, api
from etl import analytics, metrics, pipeline, runs
from etl.context import EtlContext
from etl.schemas import (
    Daily,
    Leaderboard,
    LeaderboardQuery,
    PeriodQuery,
    Run,
    RunList,
    RunsQuery,
    RunStarted,
    StartRunQuery,
)

STATIC_DIR = Path(__file__).parent / "static"


class EtlHandler(BaseHandler):
    @property
    def context(self) -> EtlContext:
        return self.settings[CONTEXT]

    @property
    def ctx(self) -> pipeline.Context:
        return self.context.pipeline

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
    @api(
        "Start an ETL run (admin)",
        query=StartRunQuery,
        responses={202: RunStarted},
        errors=(403, 409, 503),
        auth=True,
        headers={202: {"Location": "the run's URL"}},
    )
    async def post(self) -> None:
        self.require_user("admin")
        full = self.parse_query(StartRunQuery).full_refresh in ("1", "true", "yes")
        run = await pipeline.begin(self.ctx, full_refresh=full)  # 409 when another run holds the lock
        self.context.scheduler.spawn(run)
        self.set_header("Location", f"/etl/runs/{run.run_id}")
        self.write_json({"run_id": run.run_id}, status=202)

    @api("ETL runs, newest first (admin)", query=RunsQuery, responses={200: RunList}, errors=(403, 503), auth=True)
    async def get(self) -> None:
        self.require_user("admin")
        q = self.parse_query(RunsQuery)
        self.write_json({"runs": await self.on_primary(lambda conn: runs.recent(conn, q.limit, q.offset))})


class RunHandler(EtlHandler):
    @api("One ETL run (admin)", responses={200: Run}, errors=(403, 404, 503), auth=True)
    async def get(self, run_id: str) -> None:
        self.require_user("admin")
        record = await self.on_primary(lambda conn: runs.get(conn, int(run_id)))
        if record is None:
            raise NotFound(f"no run {run_id}")
        self.write_json(record)


class LeaderboardHandler(EtlHandler):
    @api(
        "Per-barber metrics over a period, sorted (admin)",
        query=LeaderboardQuery,
        responses={200: Leaderboard},
        errors=(403, 503),
        auth=True,
    )
    async def get(self) -> None:
        self.require_user("admin")
        q = self.parse_query(LeaderboardQuery)
        period = analytics.parse_period(q.from_, q.to)
        sort, order = analytics.parse_sort(q.sort, q.order)
        self.write_json(await analytics.leaderboard(self.ctx.warehouse, period, sort, order, q.limit, q.offset))


class DailyHandler(EtlHandler):
    @api(
        "One barber's metrics for every day of a period (admin, or that barber)",
        query=PeriodQuery,
        responses={200: Daily},
        errors=(403, 404, 503),
        auth=True,
    )
    async def get(self, barber_id: str) -> None:
        claims = self.require_user("admin", "employee")
        if claims.user_type == "employee" and claims.user_id != int(barber_id):
            raise Forbidden("a barber may only read their own analytics")
        q = self.parse_query(PeriodQuery)
        period = analytics.parse_period(q.from_, q.to)
        self.write_json(await analytics.daily(self.ctx.warehouse, int(barber_id), period))


class DashboardHandler(BaseHandler):
    """The page holds no data (its script signs in and calls the API), so it is public."""

    @api("The analytics dashboard (an HTML page)", responses={200: "text/html"})
    def get(self) -> None:
        self.set_header("Content-Type", "text/html; charset=UTF-8")
        self.set_header("Cache-Control", "no-cache")
        self.finish((STATIC_DIR / "dashboard.html").read_bytes())


class StatusHandler(EtlHandler):
    @api("This instance's health, warehouse and schedule", responses={200: StatusBody})
    async def get(self) -> None:
        try:
            mongo_ok = await asyncio.wait_for(self.ctx.chat.ping(), 1.0)
        except TimeoutError:
            mongo_ok = False
        warehouse = self.ctx.warehouse.view()
        self.write_json(
            {
                "status": "ok" if mongo_ok and warehouse["primary"]["healthy"] else "degraded",
                "service": "etl",
                "instance": self.ctx.instance,
                "mongo": "ok" if mongo_ok else "unavailable",
                "warehouse": warehouse,
                "authen_database": self.ctx.users.router.view(),
                "schedule": {
                    "interval_s": self.ctx.settings.etl_interval_s,
                    "consecutive_failures": self.context.scheduler.failures,
                },
            }
        )


class MetricsHandler(BaseHandler):
    @api("Prometheus metrics of the ETL", responses={200: TEXT_PLAIN})
    def get(self) -> None:
        self.set_header("Content-Type", CONTENT_TYPE_LATEST)
        self.finish(generate_latest(metrics.REGISTRY))


class StaticHandler(StaticFileHandler):
    """The dashboard's files; errors are JSON ``{"detail"}`` like every other answer."""

    def write_error(self, status_code: int, **kwargs: Any) -> None:
        self.set_header("Content-Type", "application/json; charset=UTF-8")
        self.finish(json.dumps({"detail": self._reason}))

    @api("A static file of the dashboard", responses={200: "*/*"}, errors=(403, 404), path_names=("path",))
    async def get(self, path: str, include_body: bool = True) -> None:
        await super().get(path, include_body)

    @api("A static file's headers", responses={200: None}, errors=(403, 404), path_names=("path",))
    def head(self, path: str) -> Any:
        return self.get(path, include_body=False)


def routes() -> list[tuple[Any, ...]]:
    return [
        (r"/runs", RunsHandler),
        (r"/runs/([0-9]{1,18})", RunHandler),
        (r"/analytics/barbers", LeaderboardHandler),
        (r"/analytics/barbers/([0-9]{1,18})/daily", DailyHandler),
        (r"/dashboard", DashboardHandler),
        # Tornado's static handler takes its directory as an argument (not a dependency).
        (r"/static/(.*)", StaticHandler, {"path": str(STATIC_DIR)}),
        (r"/utilities/status", StatusHandler),
        (r"/metrics", MetricsHandler),
    ]
