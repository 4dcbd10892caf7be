"""Alembic migrations of the authen database, run with ``python -m authen migrate``."""

from __future__ import annotations

from pathlib import Path

from common import migrations


def upgrade(database_url: str, revision: str = "head") -> None:
    migrations.upgrade(Path(__file__).parent, database_url, revision)
