"""coordinator log: transactions, their participants, saga steps

Revision ID: 0001_log
Revises:
Create Date: 2026-11-29
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects.postgresql import JSONB, UUID

revision = "0001_log"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "transactions",
        sa.Column("id", UUID(as_uuid=True), primary_key=True),
        sa.Column("kind", sa.String(32), nullable=False),
        sa.Column("mode", sa.String(8), nullable=False),
        sa.Column("user_id", sa.BigInteger, nullable=False),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("decision", sa.String(8)),
        sa.Column("completed", sa.Boolean, nullable=False, server_default=sa.false()),
        sa.Column("detail", sa.Text),
        sa.Column("owner", sa.String(200), nullable=False),
        sa.Column("lease_until", sa.DateTime(timezone=True), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False, server_default=sa.func.now()),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False, server_default=sa.func.now()),
        sa.Column("finished_at", sa.DateTime(timezone=True)),
        sa.CheckConstraint("mode IN ('2pc', 'saga')", name="ck_tx_mode"),
        sa.CheckConstraint("state IN ('running', 'committed', 'aborted')", name="ck_tx_state"),
        sa.CheckConstraint("decision IS NULL OR decision IN ('commit', 'abort')", name="ck_tx_decision"),
    )
    # At most one deletion of a user is unfinished at a time (the second gets 409): a
    # decided transaction still holds the user until every participant acknowledged it.
    op.create_index(
        "ux_tx_unfinished_user", "transactions", ["user_id"], unique=True, postgresql_where=sa.text("NOT completed")
    )
    op.create_index("ix_tx_unfinished", "transactions", ["completed"], postgresql_where=sa.text("NOT completed"))
    op.create_table(
        "tx_participants",
        sa.Column("tx_id", UUID(as_uuid=True), sa.ForeignKey("transactions.id"), primary_key=True),
        sa.Column("name", sa.String(32), primary_key=True),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("detail", sa.Text),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False, server_default=sa.func.now()),
    )
    op.create_table(
        "saga_steps",
        sa.Column("tx_id", UUID(as_uuid=True), sa.ForeignKey("transactions.id"), primary_key=True),
        sa.Column("position", sa.Integer, primary_key=True),
        sa.Column("name", sa.String(32), nullable=False),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("progress", JSONB, nullable=False, server_default=sa.text("'{}'::jsonb")),
        sa.Column("attempts", sa.Integer, nullable=False, server_default="0"),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False, server_default=sa.func.now()),
    )


def downgrade() -> None:
    op.drop_table("saga_steps")
    op.drop_table("tx_participants")
    op.drop_table("transactions")
