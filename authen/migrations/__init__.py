"""Alembic migrations of the authen database, run with ``python -m authen migrate``."""

from __future__ import annotations

from pathlib import Path

from alembic import command
from alembic.config import Config

from replicas import normalize_url

HERE = Path(__file__).parent


def alembic_config(database_url: str) -> Config:
    """A Config built in code (no alembic.ini needed)."""
    cfg = Config()
    cfg.set_main_option("script_location", str(HERE))
    # ConfigParser interpolation: a literal % in a password must be doubled.
    cfg.set_main_option("sqlalchemy.url", normalize_url(database_url).replace("%", "%%"))
    return cfg


def upgrade(database_url: str, revision: str = "head") -> None:
    command.upgrade(alembic_config(database_url), revision)
