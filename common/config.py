"""Configuration from environment variables, read once at start into a typed object.

Each service subclasses :class:`ServiceSettings`; field names are the environment
variable names (case-insensitive). A bad value stops the process with a message that
names the variable, instead of failing later somewhere deep in a request.
"""

from __future__ import annotations

import ipaddress
import sys
from pathlib import Path
from typing import TypeVar

from pydantic import Field, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from common.errors import describe_validation_error

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


def parse_networks(spec: str) -> tuple[Network, ...]:
    """``"127.0.0.1/32, 10.0.0.0/8"`` -> networks (a bare address is a /32 or /128);
    ValueError names a bad one."""
    return tuple(ipaddress.ip_network(part.strip(), strict=False) for part in spec.split(",") if part.strip())


class ConfigError(Exception):
    """An environment variable holds a value the service cannot use."""


class ServiceSettings(BaseSettings):
    """Settings every service shares. Defaults join the local stack (see README)."""

    model_config = SettingsConfigDict(case_sensitive=False, extra="ignore", frozen=True)

    host: str = "127.0.0.1"
    port: int = 0
    # The address other processes use to reach this instance (what it registers).
    advertise_host: str = "127.0.0.1"
    discovery_url: str = "http://127.0.0.1:8500"
    redis_url: str = "redis://127.0.0.1:16379/0"
    jwt_public_key_file: Path = Path(".stack/keys/jwt_ed25519.pub")
    service_secret_file: Path = Path(".stack/keys/service_secret")
    log_level: str = "INFO"
    # Peers whose X-Forwarded-For is believed (the gateway's addresses), comma-separated
    # networks; from anyone else the header is ignored.
    trusted_proxies: str = "127.0.0.1/32,::1/128"
    # Revoked tokens (deleted or deactivated users) are refused within this many seconds.
    token_revocation_refresh_s: float = Field(1.0, gt=0, le=60)
    max_body_bytes: int = 64 * 1024
    # Slow clients: all of a request's headers must arrive within this (it is also how
    # long an idle keep-alive connection stays open: above the 15 s after which common
    # clients, aiohttp among them, drop theirs, so they never reuse one being closed),
    # and its body within that.
    header_timeout_s: float = Field(20.0, gt=0)
    body_timeout_s: float = Field(30.0, gt=0)
    # Connections one process holds open (HTTP; upgraded sockets are no longer counted);
    # past it a new one gets a quick 503 and is closed.
    max_connections: int = Field(1000, ge=1)
    shutdown_grace_s: float = 10.0
    # Enables test-only behaviour (crash points); refused in code paths unless set.
    barber_test_hooks: bool = False
    # Test-only: a deletion participant exits at this point (see common.participant).
    participant_crash_at: str = ""
    # A transaction left prepared here this long makes the participant ask the coordinator.
    participant_outcome_after_s: float = Field(30.0, gt=0)

    @field_validator("trusted_proxies")
    @classmethod
    def _networks(cls, value: str) -> str:
        parse_networks(value)
        return value

    @model_validator(mode="after")
    def _crash_needs_test_hooks(self) -> ServiceSettings:
        if self.participant_crash_at and not self.barber_test_hooks:
            raise ValueError("PARTICIPANT_CRASH_AT is a test hook and needs BARBER_TEST_HOOKS=1")
        return self


S = TypeVar("S", bound=BaseSettings)


def chat_frame_bytes(max_message_chars: int) -> int:
    """The largest chat socket frame, for chat and the gateway alike: a message of the
    longest length with every character JSON-escaped as a surrogate pair (12 bytes),
    plus the envelope; never under 64 KiB."""
    return max(64 * 1024, 12 * max_message_chars + 1024)


def load_settings(cls: type[S]) -> S:
    """Read ``cls`` from the environment, raising :class:`ConfigError` naming the variable."""
    try:
        return cls()
    except ValidationError as e:
        raise ConfigError(f"bad environment variable {describe_validation_error(e, environment=True)}") from e


def load_settings_or_exit(cls: type[S]) -> S:
    try:
        return load_settings(cls)
    except ConfigError as e:
        print(f"{cls.__module__}: {e}", file=sys.stderr)
        raise SystemExit(2) from e
