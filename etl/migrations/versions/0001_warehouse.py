"""warehouse star schema: dim_user, fact_chat, fact_message, fact_barber_day; run records

Revision ID: 0001_warehouse
Revises:
Create Date: 2026-12-02
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects.postgresql import JSONB

revision = "0001_warehouse"
down_revision = None
branch_labels = None
depends_on = None

TS = sa.DateTime(timezone=True)


def _metrics() -> list[sa.Column]:
    return [
        sa.Column("chats_started", sa.Integer, nullable=False, server_default="0"),
        sa.Column("new_customers", sa.Integer, nullable=False, server_default="0"),
        sa.Column("returning_customers", sa.Integer, nullable=False, server_default="0"),
        sa.Column("customer_messages", sa.Integer, nullable=False, server_default="0"),
        sa.Column("barber_messages", sa.Integer, nullable=False, server_default="0"),
        sa.Column("replies", sa.Integer, nullable=False, server_default="0"),
        sa.Column("reply_time_median_s", sa.Float),
        sa.Column("reply_time_p90_s", sa.Float),
        sa.Column("unanswered_chats", sa.Integer, nullable=False, server_default="0"),
    ]


def upgrade() -> None:
    # Users (customers and barbers) as authen has them; a deleted user's row is removed.
    op.create_table(
        "dim_user",
        sa.Column("user_id", sa.BigInteger, primary_key=True, autoincrement=False),
        sa.Column("type", sa.String(16), nullable=False),
        sa.Column("username", sa.String(150), nullable=False),
        sa.Column("first_name", sa.String(150), nullable=False),
        sa.Column("last_name", sa.String(150), nullable=False),
        sa.Column("joined_at", TS, nullable=False),
        sa.Column("loaded_at", TS, nullable=False, server_default=sa.func.now()),
    )
    op.create_index("ix_dim_user_type", "dim_user", ["type"])
    # One row per chat. chat_id and customer_id are cleared when the customer is deleted.
    op.create_table(
        "fact_chat",
        sa.Column("chat_key", sa.BigInteger, sa.Identity(), primary_key=True),
        sa.Column("chat_id", sa.String(64), unique=True),
        sa.Column("barber_id", sa.BigInteger, nullable=False),
        sa.Column("customer_id", sa.BigInteger),
        sa.Column("started_at", TS, nullable=False),
        sa.Column("started_day", sa.Date, nullable=False),
        sa.Column("first_customer_message_at", TS),
        sa.Column("first_barber_reply_at", TS),
        sa.Column("message_count", sa.Integer, nullable=False, server_default="0"),
        sa.Column("last_message_at", TS),
        sa.Column("customer_deleted", sa.Boolean, nullable=False, server_default=sa.false()),
    )
    op.create_index("ix_fact_chat_barber", "fact_chat", ["barber_id", "started_day"])
    op.create_index("ix_fact_chat_customer", "fact_chat", ["customer_id"])
    # One row per message (no text): who wrote it, when, and for a customer's message
    # the barber's next message in the chat (the reply) and the time it took.
    op.create_table(
        "fact_message",
        sa.Column("chat_key", sa.BigInteger, primary_key=True, autoincrement=False),
        sa.Column("seq", sa.Integer, primary_key=True, autoincrement=False),
        sa.Column("barber_id", sa.BigInteger, nullable=False),
        sa.Column("sender_role", sa.String(8), nullable=False),
        sa.Column("sent_at", TS, nullable=False),
        sa.Column("day", sa.Date, nullable=False),
        sa.Column("reply_seq", sa.Integer),
        sa.Column("reply_at", TS),
        sa.Column("reply_s", sa.Float),
        sa.Column("reply_day", sa.Date),
        sa.CheckConstraint("sender_role IN ('customer', 'barber')", name="ck_fact_message_role"),
    )
    op.create_index("ix_fact_message_barber_day", "fact_message", ["barber_id", "day"])
    # A batch's working set: customer messages not answered yet, or answered after a seq.
    op.create_index(
        "ix_fact_message_open",
        "fact_message",
        ["chat_key", "reply_seq"],
        postgresql_where=sa.text("sender_role = 'customer'"),
    )
    op.create_index(
        "ix_fact_message_barber_reply_day",
        "fact_message",
        ["barber_id", "reply_day"],
        postgresql_where=sa.text("reply_day IS NOT NULL"),
    )
    # Per barber per day: what the analytics API and Kibana read. es_pending: changed
    # since it was last indexed into Elasticsearch.
    op.create_table(
        "fact_barber_day",
        sa.Column("barber_id", sa.BigInteger, primary_key=True, autoincrement=False),
        sa.Column("day", sa.Date, primary_key=True),
        *_metrics(),
        sa.Column("run_id", sa.BigInteger, nullable=False),
        sa.Column("es_pending", sa.Boolean, nullable=False, server_default=sa.true()),
    )
    op.create_index("ix_fact_barber_day_es", "fact_barber_day", ["es_pending"], postgresql_where=sa.text("es_pending"))
    # Deleted barbers whose Elasticsearch documents are still to be deleted.
    op.create_table("es_pending_delete", sa.Column("barber_id", sa.BigInteger, primary_key=True, autoincrement=False))
    op.create_table(
        "etl_runs",
        sa.Column("run_id", sa.BigInteger, sa.Identity(), primary_key=True),
        sa.Column("mode", sa.String(16), nullable=False),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("started_at", TS, nullable=False, server_default=sa.func.now()),
        sa.Column("finished_at", TS),
        sa.Column("rows", JSONB, nullable=False, server_default=sa.text("'{}'::jsonb")),
        sa.Column("watermarks", JSONB, nullable=False, server_default=sa.text("'{}'::jsonb")),
        sa.Column("error", sa.Text),
        sa.Column(
            "elasticsearch", JSONB, nullable=False, server_default=sa.text('\'{"indexed": 0, "error": null}\'::jsonb')
        ),
        sa.Column("instance", sa.String(200), nullable=False, server_default=""),
        sa.CheckConstraint("mode IN ('incremental', 'full')", name="ck_runs_mode"),
        sa.CheckConstraint("state IN ('running', 'succeeded', 'failed')", name="ck_runs_state"),
    )
    # The watermarks, committed in the same transaction as the rows they cover.
    op.create_table(
        "etl_state",
        sa.Column("name", sa.String(64), primary_key=True),
        sa.Column("value", JSONB, nullable=False),
    )


def downgrade() -> None:
    for table in (
        "etl_state",
        "etl_runs",
        "es_pending_delete",
        "fact_barber_day",
        "fact_message",
        "fact_chat",
        "dim_user",
    ):
        op.drop_table(table)
