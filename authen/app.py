"""Builds the authen application: database router, password hashing, tokens, guard."""

from __future__ import annotations

import logging

from redis.asyncio import Redis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

from authen import handlers
from authen.context import AuthenContext
from authen.guard import SigninGuard
from authen.participant import AuthenParticipant
from authen.passwords import Passwords
from authen.settings import AuthenSettings
from authen.users import Deps, revoke_tokens
from common.participant import watch_outcomes
from common.service import ServiceApp, make_app
from common.tokens import TokenSigner
from replicas import ReadWriteRouter

log = logging.getLogger("barber.authen")

HWM_KEY = "authen:wal_hwm"


def make_redis(url: str) -> Redis:
    # Fail fast: one quick retry (a stale pooled socket), no long backoff, short timeouts,
    # because both users of it (the high-water mark, the guard) degrade without it.
    return Redis.from_url(
        url, socket_connect_timeout=0.5, socket_timeout=0.5, retry=Retry(NoBackoff(), 1), decode_responses=False
    )


def make_router(settings: AuthenSettings, redis: Redis | None, *, with_replicas: bool = True) -> ReadWriteRouter:
    return ReadWriteRouter(
        settings.authen_database_url,
        settings.authen_replica_urls if with_replicas else None,
        redis=redis,
        hwm_key=HWM_KEY,
        max_lag_s=settings.authen_replica_max_lag_s,
        check_interval_s=settings.authen_replica_check_interval_s,
        connect_timeout_s=settings.authen_db_connect_timeout_s,
        statement_timeout_ms=settings.authen_db_statement_timeout_ms,
        pool_size=settings.authen_db_pool_size,
        max_overflow=settings.authen_db_pool_size,
    )


def make_passwords(settings: AuthenSettings) -> Passwords:
    return Passwords(
        time_cost=settings.argon2_time_cost,
        memory_kib=settings.argon2_memory_kib,
        parallelism=settings.argon2_parallelism,
        threads=settings.authen_hash_threads,
        max_pending=settings.authen_hash_queue_max,
    )


async def build(settings: AuthenSettings) -> ServiceApp:
    try:
        signer = TokenSigner.from_file(settings.jwt_private_key_file, settings.authen_token_ttl_s)
    except (OSError, ValueError) as e:
        raise SystemExit(f"authen: cannot load JWT_PRIVATE_KEY_FILE {settings.jwt_private_key_file}: {e}") from e
    redis = make_redis(settings.redis_url)
    router = make_router(settings, redis)
    passwords = make_passwords(settings)
    guard = SigninGuard(
        redis,
        max_failures=settings.authen_signin_max_failures,
        window_s=settings.authen_signin_window_s,
        slow_after=settings.authen_signin_slow_after,
        max_delay_s=settings.authen_signin_max_delay_s,
    )
    await router.start()
    deps = Deps(
        router=router,
        passwords=passwords,
        signer=signer,
        guard=guard,
        redis=redis,
        admin_username=settings.barber_admin_username,
    )
    participant = AuthenParticipant(router, lambda user_id: revoke_tokens(deps, user_id))
    ctx = AuthenContext(
        settings=settings, deps=deps, participant=participant, instance=f"{settings.advertise_host}:{settings.port}"
    )
    app = make_app(settings, handlers.routes(settings), context=ctx)
    stop_watching = await watch_outcomes(settings, participant)

    async def close() -> None:
        await stop_watching()
        await router.close()
        await redis.aclose()
        passwords.close()

    return ServiceApp(app=app, on_stop=[close], register_as="authen")
