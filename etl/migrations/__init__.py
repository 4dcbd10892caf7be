"""Alembic migrations of the warehouse, run with ``python -m etl migrate``."""

from __future__ import annotations

from pathlib import Path

from alembic import command
from alembic.config import Config

from replicas import normalize_url

HERE = Path(__file__).parent


def upgrade(database_url: str, revision: str = "head") -> None:
    cfg = Config()
    cfg.set_main_option("script_location", str(HERE))
    # ConfigParser interpolation: a literal % in a password must be doubled.
    cfg.set_main_option("sqlalchemy.url", normalize_url(database_url).replace("%", "%%"))
    command.upgrade(cfg, revision)
