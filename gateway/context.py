"""Everything one gateway process shares between its handlers."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import aiohttp
import redis.asyncio as aioredis

from gateway.accesslog import AccessLog
from gateway.breaker import State
from gateway.limiter import Limiter
from gateway.metrics import GatewayMetrics
from gateway.proxy import Proxy
from gateway.settings import GatewaySettings
from gateway.upstreams import Breakers, Service

if TYPE_CHECKING:
    from gateway.openapi import SpecSource

log = logging.getLogger("barber.gateway")


@dataclass
class GatewayContext:
    settings: GatewaySettings
    services: dict[str, Service]
    breakers: Breakers
    limiter: Limiter
    metrics: GatewayMetrics
    proxy: Proxy
    session: aiohttp.ClientSession
    redis: aioredis.Redis
    started_at: float = field(default_factory=time.time)
    # The public OpenAPI document; set once the route table (the mounted coordinator's included) is known.
    spec: SpecSource = field(init=False)
    access_log: AccessLog = field(init=False)

    def refresh_gauges(self) -> None:
        """Gauges read off the gateway's state when /metrics is scraped (not kept up to
        date on the hot path)."""
        for svc in self.services.values():
            for inst in svc.instances:
                self.metrics.in_flight.labels(inst.address).set(self.limiter.in_flight.get(inst.address, 0))
        for address, breaker in self.breakers.known().items():
            self.metrics.breaker_open.labels(address).set(1 if breaker.current() is State.OPEN else 0)
        self.metrics.limiter_degraded.set(0 if self.limiter.redis_ok else 1)

    async def status(self) -> dict[str, Any]:
        now = time.time()
        services: dict[str, Any] = {}
        everywhere = await self.limiter.shared_counts(
            [i.address for svc in self.services.values() for i in svc.instances]
        )
        for name, svc in self.services.items():
            instances = []
            for inst in svc.instances:
                instances.append(
                    {
                        "instance_id": inst.instance_id,
                        "address": inst.address,
                        "breaker": self.breakers.get(inst.address).snapshot(),
                        # This gateway's requests in flight, and all gateways' (None: Redis down).
                        "in_flight": self.limiter.in_flight.get(inst.address, 0),
                        "in_flight_all_gateways": everywhere.get(inst.address) if everywhere is not None else None,
                        "load_per_s": self.limiter.local_load(inst.address).recent(now),
                    }
                )
            services[name] = {
                "instances": instances,
                "discovery": {
                    "reachable": svc.view.reachable,
                    "version": svc.view.version,
                    "last_ok_s_ago": round(time.monotonic() - svc.view.last_ok, 3) if svc.view.last_ok else None,
                },
            }
        s = self.settings
        return {
            "status": "ok",
            "service": "gateway",
            "instance": f"{s.advertise_host}:{s.port}",
            "gateway_id": self.limiter.gateway_id,
            "uptime_s": round(now - self.started_at, 1),
            "limits": "shared" if self.limiter.shared and self.limiter.redis_ok else "local",
            "redis": "ok" if self.limiter.redis_ok else "unavailable",
            "config": {
                "lb_policy": s.lb_policy,
                "task_limit_per_service": s.task_limit_per_service,
                "task_limit_scope": s.task_limit_scope,
                "timeout_ms": s.timeout_ms,
                "max_retries": s.max_retries,
                "load_threshold_per_s_per_service": s.load_threshold_per_s_per_service,
            },
            "services": services,
        }
