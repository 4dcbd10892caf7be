"""Alembic migrations of the warehouse, run with ``python -m etl migrate``."""

from __future__ import annotations

from pathlib import Path

from common import migrations


def upgrade(database_url: str, revision: str = "head") -> None:
    migrations.upgrade(Path(__file__).parent, database_url, revision)
