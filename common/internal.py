"""The service credential: a shared secret that internal endpoints require.

Internal endpoints (participants' prepare/commit, discovery registration) are never
routed by the gateway; the credential keeps them closed to anything that reaches the
port directly without it.
"""

from __future__ import annotations

import hmac
import secrets
from pathlib import Path

from common.tokens import write_new_file

SERVICE_TOKEN_HEADER = "X-Service-Token"


def read_secret(path: Path) -> str:
    return Path(path).read_text().strip()


def generate_secret(path: Path) -> None:
    if path.exists() and not path.is_symlink():
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.is_symlink():  # never written through: whoever planted it chose its target
        path.unlink()
    write_new_file(path, secrets.token_urlsafe(32).encode(), 0o600)


def is_valid(presented: str | None, secret: str) -> bool:
    return presented is not None and hmac.compare_digest(presented.encode(), secret.encode())
