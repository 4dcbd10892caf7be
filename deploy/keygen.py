"""``python -m deploy.keygen``: the key material of a deployment, made once on first start.

Writes the Ed25519 key pair that signs and verifies tokens and the service secret that
guards internal endpoints, at the paths the services read (``JWT_PRIVATE_KEY_FILE``,
``JWT_PUBLIC_KEY_FILE``, ``SERVICE_SECRET_FILE``). Anything already there is kept, so
restarts and re-runs never invalidate issued tokens; a public key that went missing is
derived again from the private key. Modes: private key and secret 0600 (their folder
0700 for the private key), public key 0644. Who can read them is decided by which
containers mount their volumes: the private key's volume is mounted into authen alone.
"""

from __future__ import annotations

import sys
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from pydantic_settings import BaseSettings, SettingsConfigDict

from common import internal, tokens
from common.config import load_settings_or_exit


class KeySettings(BaseSettings):
    """No defaults: a deployment names every path explicitly."""

    model_config = SettingsConfigDict(case_sensitive=False, extra="ignore", frozen=True)

    jwt_private_key_file: Path
    jwt_public_key_file: Path
    service_secret_file: Path


def _derive_public(private_path: Path, public_path: Path) -> None:
    key = serialization.load_pem_private_key(private_path.read_bytes(), password=None)
    public_path.write_bytes(
        key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    )


def ensure_keys(settings: KeySettings) -> list[str]:
    """Create what is missing; return the names of the files created."""
    private, public, secret = settings.jwt_private_key_file, settings.jwt_public_key_file, settings.service_secret_file
    before = {p: p.exists() for p in (private, public, secret)}
    for folder in {private.parent, public.parent, secret.parent}:
        folder.mkdir(parents=True, exist_ok=True)
    if before[private] and not before[public]:
        _derive_public(private, public)
    tokens.generate_keypair(private, public)
    internal.generate_secret(secret)
    private.parent.chmod(0o700)
    private.chmod(0o600)
    public.chmod(0o644)
    secret.chmod(0o600)
    return [p.name for p, existed in before.items() if not existed]


def main() -> int:
    settings = load_settings_or_exit(KeySettings)
    created = ensure_keys(settings)
    # Names only: key material is never printed.
    print(f"keygen: created {', '.join(created)}" if created else "keygen: keys present, nothing to do")
    return 0


if __name__ == "__main__":
    sys.exit(main())
