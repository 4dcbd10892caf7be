"""Alembic environment of the authen database (common.migrations.run_env)."""

from __future__ import annotations

from authen.users import metadata
from common.migrations import run_env

run_env(lock_key=7_212_001, target_metadata=metadata)
