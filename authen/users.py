"""Accounts: sign-up, sign-in, the employee list and the user check, as plain async
functions over :class:`Deps` (no HTTP here; tests call them directly).

Writes go to the primary and reads to the replicas through :mod:`replicas`, whose
shared high-water mark makes a sign-up visible at once to every instance.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, StringConstraints
from redis.asyncio import Redis
from redis.exceptions import RedisError
from sqlalchemy import (
    BigInteger,
    Boolean,
    CheckConstraint,
    Column,
    DateTime,
    Identity,
    MetaData,
    String,
    Table,
    Text,
    func,
    insert,
    select,
)
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncConnection

from authen.guard import SigninGuard
from authen.passwords import Passwords
from common.errors import Conflict, DependencyUnavailable, Unauthorized
from common.tokens import TokenSigner, revoke_user
from replicas import ReadWriteRouter

log = logging.getLogger("barber.authen.users")

MAX_USER_ID = 2**63 - 1

metadata = MetaData()

# Mirrors migration 0001 (the migrations own the schema; this is for queries).
users = Table(
    "users",
    metadata,
    Column("id", BigInteger, Identity(), primary_key=True),
    Column("username", String(150), nullable=False),
    Column("password_hash", Text, nullable=False),
    Column("first_name", String(150), nullable=False),
    Column("last_name", String(150), nullable=False),
    Column("type", String(16), nullable=False),
    Column("is_active", Boolean, nullable=False, server_default="true"),
    Column("created_at", DateTime(timezone=True), nullable=False, server_default=func.now()),
    CheckConstraint("type IN ('customer', 'employee', 'admin')", name="ck_users_type"),
)

# The unique index on lower(username) (case-insensitive uniqueness).
USERNAME_INDEX = "ux_users_username_lower"

Username = Annotated[str, StringConstraints(min_length=3, max_length=150, pattern=r"^[A-Za-z0-9_.@+\-]+$")]
Password = Annotated[str, StringConstraints(min_length=8, max_length=128)]
Name = Annotated[str, StringConstraints(strip_whitespace=True, min_length=1, max_length=150)]


class SignupRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    username: Username
    password: Password
    first_name: Name
    last_name: Name
    type: Literal["customer", "employee"]


class SigninRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    # Loose on purpose: a malformed name is just a failed sign-in (401), not a hint.
    username: Annotated[str, StringConstraints(min_length=1, max_length=150)]
    password: Annotated[str, StringConstraints(min_length=1, max_length=128)]


class SigninResult(BaseModel):
    user_id: int
    token: str
    token_type: Literal["Bearer"] = "Bearer"
    expires_in: int


class RevocationUnavailable(DependencyUnavailable):
    """The revocation mark could not be written (Redis): the caller retries."""

    dependency = "redis"


@dataclass
class Deps:
    router: ReadWriteRouter
    passwords: Passwords
    signer: TokenSigner | None
    guard: SigninGuard | None
    redis: Redis | None = None
    # The admin account's name (case-insensitively): nobody else may sign up with it.
    admin_username: str = "admin"


async def revoke_tokens(deps: Deps, user_id: int) -> None:
    """Void the user's tokens everywhere (see common.tokens); 503 when Redis is away."""
    if deps.redis is None:
        return
    try:
        await revoke_user(deps.redis, user_id)
    except (RedisError, OSError) as e:
        raise RevocationUnavailable("cannot record the token revocation now; try again") from e
    log.info("tokens of user %d revoked", user_id)


# -- writes ---------------------------------------------------------------------------
async def _insert_user(
    deps: Deps, username: str, password_hash: str, first_name: str, last_name: str, user_type: str
) -> int:
    async def run(conn: AsyncConnection) -> int:
        stmt = (
            insert(users)
            .values(
                username=username,
                password_hash=password_hash,
                first_name=first_name,
                last_name=last_name,
                type=user_type,
            )
            .returning(users.c.id)
        )
        return int((await conn.execute(stmt)).scalar_one())

    try:
        return await deps.router.write(run)
    except IntegrityError as e:
        # The unique index decides, so two concurrent sign-ups of one name get one 201
        # and one 409, whichever order they commit in.
        if getattr(getattr(e.orig, "diag", None), "constraint_name", None) == USERNAME_INDEX:
            raise Conflict("username already taken") from e
        raise


async def signup(deps: Deps, req: SignupRequest) -> int:
    """A new user's id; 409 when the name is taken (or is the admin's), before any hashing,
    so a name that cannot be had costs no hash; 503 when the hashing queue is full."""
    if req.username.casefold() == deps.admin_username.casefold():
        raise Conflict("username already taken")
    if await find_by_username(deps, req.username) is not None:
        raise Conflict("username already taken")
    password_hash = await deps.passwords.hash(req.password)
    # Still decided by the unique index: a concurrent sign-up of the name may win meanwhile.
    user_id = await _insert_user(deps, req.username, password_hash, req.first_name, req.last_name, req.type)
    log.info("user %d signed up as %s", user_id, req.type)
    return user_id


async def create_admin(
    deps: Deps, username: str, password: str, first_name: str = "Admin", last_name: str = "Barber"
) -> tuple[int, bool]:
    """Create the admin account unless it exists. Returns (user_id, created)."""
    existing = await find_by_username(deps, username)
    if existing is not None:
        if existing["type"] != "admin":
            raise Conflict(f"username {username!r} belongs to a {existing['type']}, not an admin")
        return int(existing["id"]), False
    password_hash = await deps.passwords.hash(password)
    try:
        return await _insert_user(deps, username, password_hash, first_name, last_name, "admin"), True
    except Conflict:
        # Created concurrently by another run: fine if it is an admin.
        existing = await find_by_username(deps, username)
        if existing is None or existing["type"] != "admin":
            raise
        return int(existing["id"]), False


# -- reads ----------------------------------------------------------------------------
async def find_by_username(deps: Deps, username: str) -> dict[str, Any] | None:
    async def run(conn: AsyncConnection) -> dict[str, Any] | None:
        stmt = select(users).where(func.lower(users.c.username) == username.lower())
        row = (await conn.execute(stmt)).mappings().first()
        return dict(row) if row is not None else None

    return await deps.router.read(run)


async def signin(deps: Deps, req: SigninRequest, client: str = "") -> SigninResult:
    """A token for the right password; 401 otherwise (same message, similar time, whether
    the user exists or not); 429 once this client used up its attempts at the username;
    slower once the username has many failures from everywhere (authen.guard)."""
    assert deps.signer is not None, "signing key not loaded"
    # The attempt takes its slot before the password is checked (parallel guesses count).
    attempt = await deps.guard.attempt(req.username, client) if deps.guard is not None else None
    if attempt is not None and attempt.delay_s > 0:
        await asyncio.sleep(attempt.delay_s)
    user = await find_by_username(deps, req.username)
    ok = await deps.passwords.verify(user["password_hash"] if user else None, req.password)
    if not ok or user is None or not user["is_active"]:
        if deps.guard is not None and attempt is not None and attempt.client_attempts == deps.guard.max_failures:
            log.warning(
                "sign-in attempts at username %r from %s used up (%d failures from all clients)",
                req.username,
                client,
                attempt.username_attempts,
            )
        else:
            log.info(
                "failed sign-in (%s failures in window from this client)",
                attempt.client_attempts if attempt is not None else "?",
            )
        raise Unauthorized("invalid username or password")
    if deps.guard is not None:
        await deps.guard.succeeded(req.username, client)
    token = deps.signer.issue(int(user["id"]), str(user["type"]))
    return SigninResult(user_id=int(user["id"]), token=token, expires_in=deps.signer.ttl_s)


async def list_employees(deps: Deps, *, limit: int, offset: int) -> list[dict[str, Any]]:
    async def run(conn: AsyncConnection) -> list[dict[str, Any]]:
        stmt = (
            select(users.c.id, users.c.username, users.c.first_name, users.c.last_name)
            .where(users.c.type == "employee", users.c.is_active.is_(True))
            .order_by(users.c.id)
            .limit(limit)
            .offset(offset)
        )
        return [dict(r) for r in (await conn.execute(stmt)).mappings()]

    return await deps.router.read(run)


async def check(deps: Deps, user_id: int) -> dict[str, Any] | None:
    """The public profile of an active user, or None."""
    if not 1 <= user_id <= MAX_USER_ID:
        return None

    async def run(conn: AsyncConnection) -> dict[str, Any] | None:
        stmt = select(users.c.id, users.c.username, users.c.first_name, users.c.last_name, users.c.type).where(
            users.c.id == user_id, users.c.is_active.is_(True)
        )
        row = (await conn.execute(stmt)).mappings().first()
        return dict(row) if row is not None else None

    return await deps.router.read(run)
