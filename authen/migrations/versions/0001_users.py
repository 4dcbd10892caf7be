"""users: accounts with argon2id hashes, case-insensitively unique usernames

Revision ID: 0001_users
Revises:
Create Date: 2026-11-29
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0001_users"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "users",
        sa.Column("id", sa.BigInteger, sa.Identity(), primary_key=True),
        sa.Column("username", sa.String(150), nullable=False),
        sa.Column("password_hash", sa.Text, nullable=False),
        sa.Column("first_name", sa.String(150), nullable=False),
        sa.Column("last_name", sa.String(150), nullable=False),
        sa.Column("type", sa.String(16), nullable=False),
        sa.Column("is_active", sa.Boolean, nullable=False, server_default=sa.true()),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False, server_default=sa.func.now()),
        sa.CheckConstraint("type IN ('customer', 'employee', 'admin')", name="ck_users_type"),
    )
    # Uniqueness ignores case ("Bob" and "bob" are one account); sign-in looks up by it.
    op.create_index("ux_users_username_lower", "users", [sa.text("lower(username)")], unique=True)
    # The employee list: active barbers in id order.
    op.create_index(
        "ix_users_active_employees",
        "users",
        ["id"],
        postgresql_where=sa.text("type = 'employee' AND is_active"),
    )


def downgrade() -> None:
    op.drop_index("ix_users_active_employees", table_name="users")
    op.drop_index("ux_users_username_lower", table_name="users")
    op.drop_table("users")
