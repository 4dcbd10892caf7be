"""Alembic environment of the coordinator log (common.migrations.run_env)."""

from __future__ import annotations

from common.migrations import run_env

run_env(lock_key=7_212_002)
