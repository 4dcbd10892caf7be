"""Builds the etl service: sources, the warehouse router, the schedule, the API."""

from __future__ import annotations

from redis.asyncio import Redis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

from common.service import ServiceApp, make_app
from etl import handlers
from etl.context import EtlContext
from etl.extract import ChatSource, UserSource
from etl.pipeline import Context
from etl.scheduler import Scheduler
from etl.settings import EtlSettings
from replicas import ReadWriteRouter

# The high-water marks: authen's own (its sign-ups), and the warehouse's (our runs).
AUTHEN_HWM_KEY = "authen:wal_hwm"
WAREHOUSE_HWM_KEY = "warehouse:wal_hwm"


def make_redis(url: str) -> Redis:
    # Only the high-water marks use it, and they degrade to "read the primary" without it.
    return Redis.from_url(url, socket_connect_timeout=0.5, socket_timeout=0.5, retry=Retry(NoBackoff(), 1))


def make_context(settings: EtlSettings, redis: Redis | None, instance: str) -> Context:
    timeout = settings.etl_db_connect_timeout_s
    authen = ReadWriteRouter(
        settings.authen_database_url,
        settings.authen_replica_urls,
        redis=redis,
        hwm_key=AUTHEN_HWM_KEY,
        connect_timeout_s=timeout,
        statement_timeout_ms=60_000,
        pool_size=2,
        max_overflow=2,
    )
    warehouse = ReadWriteRouter(
        settings.warehouse_database_url,
        settings.warehouse_replica_urls,
        redis=redis,
        hwm_key=WAREHOUSE_HWM_KEY,
        connect_timeout_s=timeout,
        statement_timeout_ms=60_000,
        pool_size=5,
        max_overflow=5,
    )
    return Context(
        settings=settings,
        chat=ChatSource(settings.mongo_url, settings.chat_mongo_db),
        users=UserSource(authen),
        warehouse=warehouse,
        instance=instance,
    )


async def start_context(ctx: Context) -> None:
    await ctx.users.router.start()
    await ctx.warehouse.start()


async def close_context(ctx: Context) -> None:
    await ctx.warehouse.close()
    await ctx.users.router.close()
    await ctx.chat.close()


async def build(settings: EtlSettings) -> ServiceApp:
    redis = make_redis(settings.redis_url)
    ctx = make_context(settings, redis, f"{settings.advertise_host}:{settings.port}")
    await start_context(ctx)
    scheduler = Scheduler(ctx)
    scheduler.start()
    app = make_app(settings, handlers.routes(), context=EtlContext(ctx, scheduler))

    async def close() -> None:
        await scheduler.stop()
        await close_context(ctx)
        await redis.aclose()

    return ServiceApp(app=app, on_stop=[close], register_as="etl")
