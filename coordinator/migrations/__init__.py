"""Alembic migrations of the coordinator log, applied when the gateway mounts the coordinator (or ``python -m coordinator migrate``)."""

from __future__ import annotations

from pathlib import Path

from common import migrations


def upgrade(database_url: str, revision: str = "head") -> None:
    migrations.upgrade(Path(__file__).parent, database_url, revision)
