"""Alembic, once for every service with a migrations tree.

- :func:`migrate_command`: the ``migrate`` command (``python -m <service> migrate``).
- :func:`upgrade`: a tree to head, with its Config built in code (no alembic.ini).
- :func:`run_env`: the body of each tree's ``env.py``: online migrations over a
  synchronous psycopg 3 connection, serialised by a PostgreSQL advisory lock so that
  several instances starting at once (compose) apply each migration exactly once.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any


def migrate_command(prog: str, upgrade: Callable[[str], None], database_url: str, variable: str) -> int:
    """Upgrade the database at ``database_url`` (read from ``variable``) to head; an exit code."""
    from sqlalchemy.exc import OperationalError

    try:
        upgrade(database_url)
    except OperationalError as e:
        print(f"{prog} migrate: cannot reach {variable}: {e.orig}", file=sys.stderr)
        return 1
    print(f"{prog} migrate: database at head")
    return 0


def upgrade(script_location: Path, database_url: str, revision: str = "head") -> None:
    from alembic import command
    from alembic.config import Config

    from replicas import normalize_url

    cfg = Config()
    cfg.set_main_option("script_location", str(script_location))
    # ConfigParser interpolation: a literal % in a password must be doubled.
    cfg.set_main_option("sqlalchemy.url", normalize_url(database_url).replace("%", "%%"))
    command.upgrade(cfg, revision)


def run_env(lock_key: int, target_metadata: Any = None) -> None:
    """Run from a tree's ``env.py``; ``lock_key`` is that tree's own advisory lock."""
    from alembic import context
    from sqlalchemy import create_engine, pool, text

    url = context.config.get_main_option("sqlalchemy.url")
    if context.is_offline_mode():
        context.configure(url=url, target_metadata=target_metadata, literal_binds=True)
        with context.begin_transaction():
            context.run_migrations()
        return
    if url is None:
        raise RuntimeError("alembic: sqlalchemy.url is not set")
    engine = create_engine(url, poolclass=pool.NullPool, connect_args={"connect_timeout": 5})
    try:
        with engine.connect() as connection:
            context.configure(connection=connection, target_metadata=target_metadata)
            with context.begin_transaction():
                connection.execute(text("SELECT pg_advisory_xact_lock(:k)"), {"k": lock_key})
                context.run_migrations()
    finally:
        engine.dispose()
