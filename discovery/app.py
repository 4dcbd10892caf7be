"""Builds the discovery Application. Discovery itself does not register anywhere."""

from __future__ import annotations

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialBackoff

from common.service import ServiceApp, make_app
from discovery.context import DiscoveryContext
from discovery.handlers import routes
from discovery.registry import ChangeFeed, Registry, Watchers
from discovery.settings import DiscoverySettings


async def build(settings: DiscoverySettings) -> ServiceApp:
    # Brief retries only: with Redis down, callers should get a 503 at once and retry
    # on their own schedule, not hang in a client-side backoff.
    redis = aioredis.from_url(
        settings.redis_url,
        socket_timeout=5,
        socket_connect_timeout=2,
        retry=Retry(ExponentialBackoff(cap=0.2, base=0.05), 2),
    )
    registry = Registry(redis, settings.instance_ttl_s)
    watchers = Watchers()
    feed = ChangeFeed(registry, watchers, settings.sweep_interval_s)
    feed.start()
    app = make_app(settings, routes(), context=DiscoveryContext(settings, registry, watchers))

    async def close() -> None:
        await feed.stop()
        await redis.aclose()

    return ServiceApp(app, on_stop=[close], register_as=None, on_drain=[watchers.close])
