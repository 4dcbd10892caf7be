"""participant_tx: outcomes of deletion transactions seen by authen

Revision ID: 0002_participant_tx
Revises: 0001_users
Create Date: 2026-11-29
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002_participant_tx"
down_revision = "0001_users"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # "committed" rows are written inside the prepared transaction itself; "aborted" rows
    # are written by abort, so that a prepare arriving after it is refused.
    op.create_table(
        "participant_tx",
        sa.Column("gid", sa.String(200), primary_key=True),
        sa.Column("user_id", sa.BigInteger),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("recorded_at", sa.DateTime(timezone=True), nullable=False, server_default=sa.func.now()),
        sa.CheckConstraint("state IN ('committed', 'aborted')", name="ck_participant_tx_state"),
    )


def downgrade() -> None:
    op.drop_table("participant_tx")
