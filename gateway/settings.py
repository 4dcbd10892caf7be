"""Gateway settings (environment variables; defaults join the local stack).

The seed's variables keep their names: TIMEOUT_MS, TASK_LIMIT_PER_SERVICE,
LOAD_THRESHOLD_PER_S_PER_SERVICE.
"""

from __future__ import annotations

import hashlib
from typing import Literal

from pydantic import BaseModel, Field, field_validator

from common.config import ServiceSettings


class RateRule(BaseModel):
    """A token bucket per client for requests matching ``path`` (and ``methods``).

    ``path`` is the public path; a trailing ``*`` makes it a prefix. It is compared with
    the canonical path the gateway forwards (escapes of plain characters decoded), and a
    trailing ``/`` makes no difference, since the services route ``/x`` and ``/x/`` alike.
    Clients are the verified user when the request carries a valid token, else the
    client address.
    """

    path: str = Field(min_length=1)
    methods: list[str] = Field(default_factory=list)
    rate_per_s: float = Field(gt=0)
    burst: int = Field(ge=1)

    @field_validator("methods")
    @classmethod
    def _upper(cls, v: list[str]) -> list[str]:
        return [m.upper() for m in v]

    @property
    def key(self) -> str:
        """A short, stable name of this rule (its definition), for its buckets in Redis."""
        return hashlib.sha1(self.model_dump_json().encode()).hexdigest()[:10]

    def matches(self, method: str, path: str) -> bool:
        if self.methods and method not in self.methods:
            return False
        if self.path.endswith("*"):
            return path.startswith(self.path[:-1])
        return path.rstrip("/") == self.path.rstrip("/")


DEFAULT_RATE_LIMITS = [
    RateRule(path="/authen/authen/signin", methods=["POST"], rate_per_s=5.0, burst=50),
    # Each sign-up costs a password hash: one client gets a burst, then one a second.
    RateRule(path="/authen/authen/signup", methods=["POST"], rate_per_s=1.0, burst=20),
]


class GatewaySettings(ServiceSettings):
    port: int = 8000
    # Service types routed as /<type>/<rest> -> /<rest> on an instance of that type.
    gateway_services: str = "authen,chat,etl"

    timeout_ms: int = Field(default=6000, ge=1, le=600_000)
    # Per-attempt bound (0: an attempt may use all that is left of TIMEOUT_MS).
    attempt_timeout_ms: int = Field(default=0, ge=0, le=600_000)
    max_retries: int = Field(default=2, ge=0, le=10)
    retry_backoff_ms: int = Field(default=25, ge=0, le=10_000)

    task_limit_per_service: int = Field(default=64, ge=1, le=100_000)
    # shared: the limit holds over all gateways together (decided in Redis, one round
    # trip a request); local: each gateway enforces it by its own counts (no Redis round
    # trip unless a rate limit applies). Exact either way for one gateway.
    task_limit_scope: Literal["shared", "local"] = "shared"
    load_threshold_per_s_per_service: int = Field(default=200, ge=1)
    lb_policy: Literal["round_robin", "least_outstanding"] = "round_robin"

    breaker_failures: int = Field(default=5, ge=1)
    breaker_failure_rate: float = Field(default=0.5, gt=0, le=1)
    breaker_window_s: float = Field(default=10.0, gt=0)
    breaker_min_requests: int = Field(default=20, ge=1)
    breaker_open_ms: int = Field(default=5000, ge=10)
    breaker_open_max_ms: int = Field(default=30_000, ge=10)
    breaker_half_open_trials: int = Field(default=3, ge=1)
    # Failures a client may have chosen (5xx, timeouts, resets) open a breaker only when
    # this many distinct clients had them; connect failures count for any client.
    breaker_min_clients: int = Field(default=3, ge=1)

    rate_limits: list[RateRule] = Field(default_factory=lambda: list(DEFAULT_RATE_LIMITS))

    # A gateway's share of the task counts in Redis lives this long without renewal, so
    # a gateway killed mid-request leaks nothing beyond it.
    limiter_owner_ttl_ms: int = Field(default=3000, ge=200)
    limiter_redis_timeout_ms: int = Field(default=500, ge=10)

    upstream_connect_timeout_ms: int = Field(default=1000, ge=10)
    upstream_max_connections: int = Field(default=512, ge=1)

    # "uvloop" (a dependency) runs the gateway on uvloop; "asyncio": the standard loop.
    gateway_event_loop: Literal["asyncio", "uvloop"] = "uvloop"
    # "lean": plain proxied requests are served by gateway.front (httptools, one send per
    # answer) and the rest by Tornado; "tornado": Tornado's server serves everything (for
    # comparison: bench/gateway.py measures both).
    gateway_front: Literal["lean", "tornado"] = "lean"

    # Test aid: route authen's /utilities/sleepy (the stack sets it; never in production).
    enable_sleepy: bool = False

    # Frames over chat's limit (derived from its message length, the same variable as
    # chat's) close the client's socket here, before they cost an upstream hop.
    chat_max_message_chars: int = Field(default=4000, ge=1)
    # Pings on the client leg, so sockets of vanished clients are reaped.
    ws_ping_interval_s: float = Field(default=20.0, gt=0)
    ws_ping_timeout_s: float = Field(default=15.0, gt=0)

    @property
    def services(self) -> list[str]:
        return [s.strip() for s in self.gateway_services.split(",") if s.strip()]
