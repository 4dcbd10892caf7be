"""Alembic environment: online migrations over a synchronous psycopg 3 connection.

An advisory lock serialises concurrent runs (several instances starting at once in
compose), so each migration is applied exactly once.
"""

from __future__ import annotations

from alembic import context
from sqlalchemy import create_engine, pool, text

from authen.users import metadata

MIGRATION_LOCK = 7_212_001  # pg_advisory_xact_lock key for authen migrations

config = context.config
target_metadata = metadata


def run_migrations_offline() -> None:
    context.configure(url=config.get_main_option("sqlalchemy.url"), target_metadata=target_metadata,
                      literal_binds=True)
    with context.begin_transaction():
        context.run_migrations()


def run_migrations_online() -> None:
    engine = create_engine(
        config.get_main_option("sqlalchemy.url"),
        poolclass=pool.NullPool,
        connect_args={"connect_timeout": 5},
    )
    with engine.connect() as connection:
        context.configure(connection=connection, target_metadata=target_metadata, transaction_per_migration=False)
        with context.begin_transaction():
            connection.execute(text("SELECT pg_advisory_xact_lock(:k)"), {"k": MIGRATION_LOCK})
            context.run_migrations()
    engine.dispose()


if context.is_offline_mode():
    run_migrations_offline()
else:
    run_migrations_online()
