"""Ed25519-signed JWTs. authen alone signs; every service verifies with the public key."""

from __future__ import annotations

import os
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

ALGORITHM = "EdDSA"


class InvalidToken(Exception):
    """The token is missing, malformed, expired, or not signed by our key."""


@dataclass(frozen=True, slots=True)
class Claims:
    user_id: int
    user_type: str
    issued_at: int
    expires_at: int
    token_id: str


class TokenVerifier:
    def __init__(self, public_key_pem: bytes) -> None:
        self._key = serialization.load_pem_public_key(public_key_pem)

    @classmethod
    def from_file(cls, path: Path) -> "TokenVerifier":
        return cls(Path(path).read_bytes())

    def verify(self, token: str) -> Claims:
        try:
            payload = jwt.decode(
                token,
                self._key,
                algorithms=[ALGORITHM],
                options={"require": ["sub", "typ", "iat", "exp", "jti"]},
            )
            return Claims(
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


class TokenSigner:
    def __init__(self, private_key_pem: bytes, ttl_s: int) -> None:
        self._key = serialization.load_pem_private_key(private_key_pem, password=None)
        self.ttl_s = ttl_s

    @classmethod
    def from_file(cls, path: Path, ttl_s: int) -> "TokenSigner":
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
    if private_path.exists() and public_path.exists():
        return
    private_path.parent.mkdir(parents=True, exist_ok=True)
    key = Ed25519PrivateKey.generate()
    private_pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    public_pem = key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    fd = os.open(private_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(private_pem)
    public_path.write_bytes(public_pem)
