"""Builds the gateway Application.

The deletion coordinator is mounted into it (``/admin/...`` and the participants'
outcome query), served before the proxy routes: it gets only a
:class:`coordinator.app.Host` (the discovery views) and brings its own context.
"""

from __future__ import annotations

import asyncio
import logging

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

from common import internal
from common.config import chat_frame_bytes, load_settings
from common.discovery import InstanceView
from common.openapi import fragment
from common.service import Listener, Server, ServiceApp, make_app
from coordinator.app import Host as CoordinatorHost
from coordinator.app import build as build_coordinator
from coordinator.settings import CoordinatorSettings
from gateway.accesslog import AccessLog
from gateway.breaker import BreakerConfig, State
from gateway.context import GatewayContext
from gateway.forwarding import LeanProxy
from gateway.front import Front
from gateway.handlers import routes
from gateway.limiter import Limiter
from gateway.metrics import GatewayMetrics
from gateway.openapi import SpecSource
from gateway.proxy import Proxy, make_pool, make_session
from gateway.settings import GatewaySettings
from gateway.upstreams import Breakers, Service

log = logging.getLogger("barber.gateway")


def breaker_config(s: GatewaySettings) -> BreakerConfig:
    return BreakerConfig(
        failures=s.breaker_failures,
        failure_rate=s.breaker_failure_rate,
        window_s=s.breaker_window_s,
        min_requests=s.breaker_min_requests,
        open_s=s.breaker_open_ms / 1000,
        open_max_s=max(s.breaker_open_ms, s.breaker_open_max_ms) / 1000,
        half_open_trials=s.breaker_half_open_trials,
        min_clients=s.breaker_min_clients,
    )


async def build(settings: GatewaySettings) -> ServiceApp:
    metrics = GatewayMetrics()
    # No client-side retries: a Redis that is down must fail fast (the limiter falls back).
    redis = aioredis.from_url(
        settings.redis_url,
        socket_timeout=settings.limiter_redis_timeout_ms / 1000,
        socket_connect_timeout=settings.limiter_redis_timeout_ms / 1000,
        retry=Retry(NoBackoff(), 0),
    )
    limiter = Limiter(
        redis,
        owner_ttl_ms=settings.limiter_owner_ttl_ms,
        timeout_s=settings.limiter_redis_timeout_ms / 1000,
        shared=settings.task_limit_scope == "shared",
    )

    def on_transition(address: str, old: State, new: State) -> None:
        metrics.breaker_transitions.labels(address, old.value, new.value).inc()
        metrics.breaker_open.labels(address).set(1 if new is State.OPEN else 0)
        # Selectable by a Kibana rule: event.action breaker-open / breaker-half-open / breaker-closed.
        fields = {
            "event.kind": "alert" if new is State.OPEN else "event",
            "event.action": f"breaker-{new.value.replace('_', '-')}",
            "barber.upstream.instance": address,
            "barber.breaker.state": new.value,
            "barber.breaker.previous_state": old.value,
        }
        if new is State.OPEN:
            log.warning("Tripped the circuit for %s (%s -> open)", address, old.value, extra=fields)
        else:
            log.info("circuit for %s: %s -> %s", address, old.value, new.value, extra=fields)

    breakers = Breakers(breaker_config(settings), on_transition)
    services = {name: Service(name, InstanceView(settings.discovery_url, name), breakers) for name in settings.services}
    await asyncio.gather(*(svc.view.start(initial_timeout_s=3.0) for svc in services.values()))
    limiter.start()
    session = make_session(settings)
    pool = make_pool(settings)
    proxy = Proxy(settings, services, limiter, metrics, pool)
    ctx = GatewayContext(settings, services, breakers, limiter, metrics, proxy, session, redis)

    coordinator = await build_coordinator(
        load_settings(CoordinatorSettings), CoordinatorHost(instances=lambda name: services[name].instances)
    )

    if not settings.jwt_public_key_file.exists():
        log.error(
            "no JWT public key at %s: every path that needs a token will answer 401", settings.jwt_public_key_file
        )
    lean = LeanProxy(ctx)
    table = routes(settings.services, lean)
    secret = internal.read_secret(settings.service_secret_file) if settings.service_secret_file.exists() else ""
    spec = SpecSource(
        settings, fragment(coordinator.routes + table), lambda name: services[name].instances, session, secret
    )
    ctx.spec = spec
    ctx.access_log = AccessLog("gateway", f"{settings.advertise_host}:{settings.port}")
    app = make_app(
        settings,
        table,
        context=ctx,
        mounts=[coordinator],
        websocket_max_message_size=chat_frame_bytes(settings.chat_max_message_chars),
        websocket_ping_interval=settings.ws_ping_interval_s,
        websocket_ping_timeout=settings.ws_ping_timeout_s,
    )
    lean.app_settings = app.settings
    # The same ECS access line as every service's, written in batches (gateway.accesslog).
    app.settings["log_function"] = ctx.access_log.log_request
    spec.start()

    async def close() -> None:
        await spec.stop()
        for closer in coordinator.on_stop:
            await closer()
        for svc in services.values():
            await svc.view.stop()
        await limiter.stop()
        await session.close()
        await pool.close()
        await redis.aclose()
        ctx.access_log.flush()

    def front(tornado_server: Server) -> Listener:
        if settings.gateway_front == "tornado":
            return tornado_server
        return Front(
            ctx,
            app.settings,
            tornado_server,
            max_body_bytes=settings.max_body_bytes,
            header_timeout_s=settings.header_timeout_s,
            body_timeout_s=settings.body_timeout_s,
            max_connections=settings.max_connections,
        )

    return ServiceApp(app, on_stop=[close], register_as="gateway", server=front)
