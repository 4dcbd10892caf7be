"""Ed25519-signed JWTs. authen alone signs; every service verifies with the public key.

Revocation: deleting or deactivating a user sets a per-user mark in Redis, "every token
of this user issued at or before T is void" (:func:`revoke_user`). Every verifier checks
the mark from a local copy (:class:`Revocations`) that a background task refreshes, so a
request costs no round trip and a revoked token is refused everywhere within
``TOKEN_REVOCATION_REFRESH_S``. A mark outlives every token it can affect (the lifetime is
capped at :data:`MAX_TOKEN_TTL_S`), then is dropped, so the set stays small.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from redis.asyncio import Redis
from redis.exceptions import RedisError

from common.tasks import cancel_and_wait

log = logging.getLogger("barber.tokens")

ALGORITHM = "EdDSA"
# No token lives longer than this (AUTHEN_TOKEN_TTL_S is capped at it); a revocation mark
# is kept as long, since no token it voids can outlive it.
MAX_TOKEN_TTL_S = 24 * 3600

REVOKED_KEY = "tokens:revoked"  # hash: user id -> T (epoch seconds)
REVOKED_VERSION_KEY = "tokens:revoked:version"  # bumped on every change

# Keep the later of two marks, bump the version: one round trip, atomic.
_REVOKE_SCRIPT = """
local old = tonumber(redis.call('HGET', KEYS[1], ARGV[1]) or '0')
if tonumber(ARGV[2]) > old then redis.call('HSET', KEYS[1], ARGV[1], ARGV[2]) end
return redis.call('INCR', KEYS[2])
"""


async def revoke_user(redis: Redis, user_id: int, at: float | None = None) -> None:
    """Void every token of ``user_id`` issued up to now (idempotent). Raises RedisError."""
    mark = int(time.time() if at is None else at)
    await redis.eval(_REVOKE_SCRIPT, 2, REVOKED_KEY, REVOKED_VERSION_KEY, str(user_id), str(mark))


class InvalidToken(Exception):
    """The token is missing, malformed, expired, or not signed by our key."""


@dataclass(frozen=True, slots=True)
class Claims:
    user_id: int
    user_type: str
    issued_at: int
    expires_at: int
    token_id: str


class Revocations:
    """This process's copy of the revocation marks, refreshed in the background.

    Each refresh reads only the version counter unless it moved, so an idle system costs
    one small read per interval per process. When Redis is away the last copy stays in
    force (tokens are still checked for signature and expiry) and the refresh retries.
    ``listeners`` are called with (user id, mark) for each new or later mark (chat closes
    the user's sockets).
    """

    def __init__(self, redis_url: str, refresh_s: float = 1.0) -> None:
        self._redis = Redis.from_url(redis_url, socket_timeout=2, socket_connect_timeout=1, decode_responses=True)
        self.refresh_s = refresh_s
        self.marks: dict[int, int] = {}
        self.listeners: list[Callable[[int, int], None]] = []
        self._version: bytes | str | None = None
        self._loaded = False
        self._task: asyncio.Task[None] | None = None
        self._failing = False

    def revoked(self, claims: Claims) -> bool:
        mark = self.marks.get(claims.user_id)
        # Marks have whole seconds, as iat does: a token issued in the revoking second is
        # void too (a user being deleted or deactivated cannot sign in meanwhile).
        return mark is not None and claims.issued_at <= mark

    async def refresh(self) -> None:
        """Read the marks if they changed since the last read. Raises RedisError."""
        version = await self._redis.get(REVOKED_VERSION_KEY)
        if self._loaded and version == self._version:
            return
        raw = await self._redis.hgetall(REVOKED_KEY)
        horizon = time.time() - MAX_TOKEN_TTL_S - 60
        marks: dict[int, int] = {}
        expired: list[str] = []
        for user, mark in raw.items():
            if int(mark) < horizon:
                expired.append(str(user))
            else:
                marks[int(user)] = int(mark)
        if expired:
            await self._redis.hdel(REVOKED_KEY, *expired)
        fresh = [(u, m) for u, m in marks.items() if self.marks.get(u, -1) < m]
        self.marks = marks
        self._version = version
        self._loaded = True
        for user_id, at in fresh:
            for listener in self.listeners:
                try:
                    listener(user_id, at)
                except Exception:  # one listener's bug must not stop revocations
                    log.exception("revocation listener failed")

    async def _loop(self) -> None:
        while True:
            await asyncio.sleep(self.refresh_s)
            try:
                await self.refresh()
                if self._failing:
                    log.info("token revocations are read again")
                self._failing = False
            except (RedisError, OSError, ValueError) as e:
                if not self._failing:
                    log.warning("cannot read token revocations (%s); keeping the last %d", e, len(self.marks))
                self._failing = True

    async def start(self) -> None:
        try:
            await asyncio.wait_for(self.refresh(), 2.0)
        except (RedisError, OSError, ValueError, TimeoutError) as e:
            log.warning("token revocations not read at start (%s); retrying in the background", e)
            self._failing = True
        self._task = asyncio.create_task(self._loop())

    async def stop(self) -> None:
        await cancel_and_wait(self._task)
        await self._redis.aclose()


class TokenVerifier:
    def __init__(self, public_key_pem: bytes, revocations: Revocations | None = None) -> None:
        key = serialization.load_pem_public_key(public_key_pem)
        if not isinstance(key, Ed25519PublicKey):
            raise TypeError(f"tokens are verified with an Ed25519 public key, not {type(key).__name__}")
        self._key = key
        self.revocations = revocations

    @classmethod
    def from_file(cls, path: Path, revocations: Revocations | None = None) -> TokenVerifier:
        return cls(Path(path).read_bytes(), revocations)

    def verify(self, token: str) -> Claims:
        try:
            payload = jwt.decode(
                token,
                self._key,
                algorithms=[ALGORITHM],
                options={"require": ["sub", "typ", "iat", "exp", "jti"]},
            )
            claims = Claims(
                user_id=int(payload["sub"]),
                user_type=str(payload["typ"]),
                issued_at=int(payload["iat"]),
                expires_at=int(payload["exp"]),
                token_id=str(payload["jti"]),
            )
        except jwt.ExpiredSignatureError as e:
            raise InvalidToken("token expired") from e
        except (jwt.InvalidTokenError, ValueError, TypeError) as e:
            raise InvalidToken("invalid token") from e
        if self.revocations is not None and self.revocations.revoked(claims):
            raise InvalidToken("token revoked")
        return claims


def verify_or_none(verifier: TokenVerifier | None, token: str | None) -> Claims | None:
    """The claims of ``token``; None without a token or a verifier, or when it is invalid
    (for callers that treat an anonymous and a badly authenticated request alike)."""
    if not token or verifier is None:
        return None
    try:
        return verifier.verify(token)
    except InvalidToken:
        return None


class TokenSigner:
    def __init__(self, private_key_pem: bytes, ttl_s: int) -> None:
        key = serialization.load_pem_private_key(private_key_pem, password=None)
        if not isinstance(key, Ed25519PrivateKey):
            raise TypeError(f"tokens are signed with an Ed25519 private key, not {type(key).__name__}")
        self._key = key
        self.ttl_s = ttl_s

    @classmethod
    def from_file(cls, path: Path, ttl_s: int) -> TokenSigner:
        return cls(Path(path).read_bytes(), ttl_s)

    def issue(self, user_id: int, user_type: str, *, ttl_s: int | None = None) -> str:
        now = int(time.time())
        payload = {
            # RFC 7519 wants `sub` to be a string.
            "sub": str(user_id),
            "typ": user_type,
            "iat": now,
            "exp": now + (self.ttl_s if ttl_s is None else ttl_s),
            "jti": uuid.uuid4().hex,
        }
        return jwt.encode(payload, self._key, algorithm=ALGORITHM)


def generate_keypair(private_path: Path, public_path: Path) -> None:
    """Write a new Ed25519 key pair unless one is already there (private key mode 0600)."""
    if all(p.exists() and not p.is_symlink() for p in (private_path, public_path)):
        return
    private_path.parent.mkdir(parents=True, exist_ok=True)
    key = Ed25519PrivateKey.generate()
    private_pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    public_pem = key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    # A half-written pair (one file left by a crash) is replaced; each file is created
    # anew (O_EXCL), never through a link planted where it goes (O_NOFOLLOW).
    for path in (private_path, public_path):
        if path.is_symlink() or path.exists():
            path.unlink()
    write_new_file(private_path, private_pem, 0o600)
    write_new_file(public_path, public_pem, 0o644)


def write_new_file(path: Path, data: bytes, mode: int) -> None:
    """Create ``path`` with ``data``: fails if anything (a file, a symlink) is there."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, mode)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
