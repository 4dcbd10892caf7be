"""authen's configuration (environment variables; defaults join the local stack)."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field

from common.config import ServiceSettings
from common.tokens import MAX_TOKEN_TTL_S

_LOCAL_PG = "postgresql+psycopg://barber@127.0.0.1:{port}/authen"


class AuthenSettings(ServiceSettings):
    port: int = 8101
    # Writes go here.
    authen_database_url: str = _LOCAL_PG.format(port=15432)
    # Comma-separated streaming replicas for reads; empty: the primary serves reads too.
    authen_replica_urls: str = ",".join(_LOCAL_PG.format(port=p) for p in (15433, 15434))
    jwt_private_key_file: Path = Path(".stack/keys/jwt_ed25519.pem")
    # Capped: a token cannot be revoked for longer than revocation marks are kept.
    authen_token_ttl_s: int = Field(3600, ge=60, le=MAX_TOKEN_TTL_S)

    # argon2id cost (OWASP's first recommendation: 19 MiB, 2 passes, 1 lane).
    argon2_time_cost: int = Field(2, ge=1)
    argon2_memory_kib: int = Field(19456, ge=1024)
    argon2_parallelism: int = Field(1, ge=1)
    # Threads that hash, so hashing never blocks the event loop.
    authen_hash_threads: int = Field(2, ge=1)
    # Hashes running or waiting, at most; past it sign-up/sign-in answer 503 at once.
    authen_hash_queue_max: int = Field(16, ge=1)

    # Brute-force guard (see docs/security.md): this many failed sign-ins for one username
    # from one client address within the window stop that client (429) until it ends...
    authen_signin_max_failures: int = Field(5, ge=1)
    authen_signin_window_s: int = Field(300, ge=1)
    # ...and past this many failures for the username from all clients together, every
    # attempt at it waits, longer with each failure, up to the maximum delay (no lock-out).
    authen_signin_slow_after: int = Field(20, ge=1)
    authen_signin_max_delay_s: float = Field(2.0, ge=0, le=10)

    # Read routing (replicas/).
    authen_replica_max_lag_s: float = Field(5.0, gt=0)
    authen_replica_check_interval_s: float = Field(0.2, gt=0)
    authen_db_connect_timeout_s: float = Field(2.0, gt=0)
    authen_db_statement_timeout_ms: int = Field(5000, ge=100)
    # Per node and engine; as many again may overflow under bursts.
    authen_db_pool_size: int = Field(5, ge=1)

    # /utilities/sleepy exists only when set (the local stack sets it).
    enable_sleepy: bool = False

    # create-admin defaults.
    barber_admin_username: str = "admin"
    barber_admin_password: str = ""
