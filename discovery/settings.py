"""Discovery settings (environment variables; defaults join the local stack)."""

from __future__ import annotations

from pydantic import Field

from common.config import ServiceSettings


class DiscoverySettings(ServiceSettings):
    port: int = 8500
    # Seconds a registration lives without a heartbeat (clients heartbeat every TTL/3).
    instance_ttl_s: float = Field(default=10.0, gt=0.5, le=3600)
    # How often expired registrations are swept and announced to watchers.
    sweep_interval_s: float = Field(default=1.0, gt=0, le=60)
    # Upper bound of a long poll's `wait` (seconds).
    max_wait_s: float = Field(default=30.0, gt=0, le=300)
