"""The service credential: a shared secret that internal endpoints require.

Internal endpoints (participants' prepare/commit, discovery registration) are never
routed by the gateway; the credential keeps them closed to anything that reaches the
port directly without it.
"""

from __future__ import annotations

import hmac
import os
import secrets
from pathlib import Path

SERVICE_TOKEN_HEADER = "X-Service-Token"


def read_secret(path: Path) -> str:
    return Path(path).read_text().strip()


def generate_secret(path: Path) -> None:
    if path.exists():
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(secrets.token_urlsafe(32))


def is_valid(presented: str | None, secret: str) -> bool:
    return presented is not None and hmac.compare_digest(presented.encode(), secret.encode())
