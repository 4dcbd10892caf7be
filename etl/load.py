"""Loading into the warehouse star schema (see docs/etl.md), inside the run's one
transaction: idempotent upserts, then the per-chat and per-barber-per-day facts are
recomputed in SQL for exactly the chats and (barber, day) pairs the run touched.

Every function takes the run's open psycopg connection; nothing here commits.
"""

from __future__ import annotations

import io
import logging
from typing import Any

import pandas as pd
from psycopg import AsyncConnection

log = logging.getLogger("barber.etl.load")

FACT_TABLES = ("fact_message", "fact_chat", "fact_barber_day", "dim_user", "etl_state")

_DAY = "(to_timestamp({0}) AT TIME ZONE 'UTC')::date"
# Exact: integer microseconds to a timestamp, and its UTC day.
_TS_US = "(timestamptz 'epoch' + {0} * interval '1 microsecond')"
_DAY_US = "((timestamptz 'epoch' + {0} * interval '1 microsecond') AT TIME ZONE 'UTC')::date"

_TEMP_TABLES = """
CREATE TEMP TABLE tmp_affected (barber_id bigint, day date, PRIMARY KEY (barber_id, day)) ON COMMIT DROP;
CREATE TEMP TABLE tmp_touched (chat_key bigint PRIMARY KEY) ON COMMIT DROP;
CREATE TEMP TABLE tmp_in (chat_key bigint, seq int, barber_id bigint, sender_role text, sent_us bigint,
                          reply_seq int, reply_us bigint, reply_s float8) ON COMMIT DROP;
"""

# The working set of a batch (see compute_replies): per chat, every stored message after
# the batch's lowest new seq, and the customer messages before it whose reply may change
# (none yet, or one after that seq).
_WORKING_SET = """
SELECT m.chat_key, m.seq, m.barber_id, m.sender_role, (extract(epoch FROM m.sent_at) * 1000000)::bigint AS sent_us
FROM unnest(%s::bigint[], %s::int[]) AS n(chat_key, min_seq)
CROSS JOIN LATERAL (
    SELECT f.* FROM fact_message f WHERE f.chat_key = n.chat_key AND f.seq > n.min_seq
    UNION
    SELECT f.* FROM fact_message f
    WHERE f.chat_key = n.chat_key AND f.sender_role = 'customer' AND f.reply_seq IS NULL
    UNION
    SELECT f.* FROM fact_message f
    WHERE f.chat_key = n.chat_key AND f.sender_role = 'customer' AND f.reply_seq > n.min_seq
) m
"""
# (Per chat, three index range scans (the primary key, and ix_fact_message_open on the
# customer messages' replies), so the cost follows the batch, never the table.)

_AFFECTED_BY_BATCH = f"""
INSERT INTO tmp_affected (barber_id, day)
SELECT m.barber_id, m.reply_day FROM fact_message m JOIN tmp_in USING (chat_key, seq) WHERE m.reply_day IS NOT NULL
UNION SELECT barber_id, {_DAY_US.format("sent_us")} FROM tmp_in
UNION SELECT barber_id, {_DAY_US.format("reply_us")} FROM tmp_in WHERE reply_us IS NOT NULL
ON CONFLICT DO NOTHING
"""

_UPSERT_MESSAGES = f"""
INSERT INTO fact_message (chat_key, seq, barber_id, sender_role, sent_at, day, reply_seq, reply_at, reply_s, reply_day)
SELECT chat_key, seq, barber_id, sender_role, {_TS_US.format("sent_us")}, {_DAY_US.format("sent_us")},
       reply_seq, {_TS_US.format("reply_us")}, reply_s, {_DAY_US.format("reply_us")}
FROM tmp_in
ON CONFLICT (chat_key, seq) DO UPDATE SET
    reply_seq = EXCLUDED.reply_seq, reply_at = EXCLUDED.reply_at, reply_s = EXCLUDED.reply_s,
    reply_day = EXCLUDED.reply_day
"""

_REFRESH_CHATS = """
UPDATE fact_chat c SET first_customer_message_at = s.first_customer, first_barber_reply_at = s.first_reply,
                       message_count = s.n, last_message_at = s.last
FROM (SELECT chat_key, min(sent_at) FILTER (WHERE sender_role = 'customer') AS first_customer,
             min(reply_at) AS first_reply, count(*) AS n, max(sent_at) AS last
      FROM fact_message WHERE chat_key IN (SELECT chat_key FROM tmp_touched) GROUP BY chat_key) s
WHERE c.chat_key = s.chat_key
"""

# The metrics of one (barber, day): the definitions are in docs/etl.md, and
# etl.analytics computes the same for a whole period.
_REFRESH_DAYS = """
WITH a AS (SELECT barber_id, day FROM tmp_affected),
msg AS (
    SELECT m.barber_id, m.day,
           count(*) FILTER (WHERE m.sender_role = 'customer') AS customer_messages,
           count(*) FILTER (WHERE m.sender_role = 'barber') AS barber_messages,
           count(DISTINCT m.chat_key) FILTER (WHERE m.sender_role = 'customer' AND c.started_day < m.day)
               AS returning_customers,
           count(DISTINCT m.chat_key) FILTER (WHERE m.sender_role = 'customer'
                                              AND (m.reply_day IS NULL OR m.reply_day > m.day)) AS unanswered_chats
    FROM fact_message m JOIN a USING (barber_id, day) JOIN fact_chat c USING (chat_key)
    GROUP BY m.barber_id, m.day),
rep AS (
    SELECT m.barber_id, m.reply_day AS day, count(*) AS replies,
           percentile_cont(0.5) WITHIN GROUP (ORDER BY m.reply_s) AS median,
           percentile_cont(0.9) WITHIN GROUP (ORDER BY m.reply_s) AS p90
    FROM fact_message m JOIN a ON a.barber_id = m.barber_id AND a.day = m.reply_day
    GROUP BY m.barber_id, m.reply_day),
ch AS (
    SELECT c.barber_id, c.started_day AS day, count(*) AS started
    FROM fact_chat c JOIN a ON a.barber_id = c.barber_id AND a.day = c.started_day
    GROUP BY c.barber_id, c.started_day)
INSERT INTO fact_barber_day AS d (barber_id, day, chats_started, new_customers, returning_customers,
    customer_messages, barber_messages, replies, reply_time_median_s, reply_time_p90_s, unanswered_chats,
    run_id, es_pending)
SELECT a.barber_id, a.day, COALESCE(ch.started, 0), COALESCE(ch.started, 0), COALESCE(msg.returning_customers, 0),
       COALESCE(msg.customer_messages, 0), COALESCE(msg.barber_messages, 0), COALESCE(rep.replies, 0),
       rep.median, rep.p90, COALESCE(msg.unanswered_chats, 0), %(run_id)s, true
FROM a LEFT JOIN msg USING (barber_id, day) LEFT JOIN rep USING (barber_id, day) LEFT JOIN ch USING (barber_id, day)
ON CONFLICT (barber_id, day) DO UPDATE SET
    chats_started = EXCLUDED.chats_started, new_customers = EXCLUDED.new_customers,
    returning_customers = EXCLUDED.returning_customers, customer_messages = EXCLUDED.customer_messages,
    barber_messages = EXCLUDED.barber_messages, replies = EXCLUDED.replies,
    reply_time_median_s = EXCLUDED.reply_time_median_s, reply_time_p90_s = EXCLUDED.reply_time_p90_s,
    unanswered_chats = EXCLUDED.unanswered_chats, run_id = EXCLUDED.run_id, es_pending = true
"""

_DROP_EMPTY_DAYS = """
DELETE FROM fact_barber_day d USING tmp_affected a
WHERE d.barber_id = a.barber_id AND d.day = a.day
  AND d.chats_started = 0 AND d.customer_messages = 0 AND d.barber_messages = 0 AND d.replies = 0
"""


async def begin(conn: AsyncConnection, *, full_refresh: bool) -> None:
    """Start the run's work inside its transaction (already open on ``conn``)."""
    await conn.execute(_TEMP_TABLES)
    if full_refresh:
        await conn.execute(f"TRUNCATE {', '.join(FACT_TABLES)} RESTART IDENTITY")


async def watermarks(conn: AsyncConnection) -> dict[str, Any]:
    rows = await (await conn.execute("SELECT name, value FROM etl_state")).fetchall()
    return dict(rows)


async def save_watermarks(conn: AsyncConnection, marks: dict[str, Any]) -> None:
    from psycopg.types.json import Jsonb

    for name, value in marks.items():
        await conn.execute(
            "INSERT INTO etl_state (name, value) VALUES (%s, %s) ON CONFLICT (name) DO UPDATE SET value = EXCLUDED.value",
            (name, Jsonb(value)),
        )


# -- users -----------------------------------------------------------------------------
async def known_user_ids(conn: AsyncConnection) -> set[int]:
    """Every user id the warehouse holds anywhere (dimension and per-chat facts)."""
    cur = await conn.execute(
        "SELECT user_id FROM dim_user UNION SELECT barber_id FROM fact_chat "
        "UNION SELECT customer_id FROM fact_chat WHERE customer_id IS NOT NULL"
    )
    return {r[0] for r in await cur.fetchall()}


async def dim_user_ids(conn: AsyncConnection) -> set[int]:
    return {r[0] for r in await (await conn.execute("SELECT user_id FROM dim_user")).fetchall()}


async def upsert_users(conn: AsyncConnection, rows: list[dict[str, Any]]) -> int:
    if not rows:
        return 0
    async with conn.cursor() as cur:
        await cur.executemany(
            "INSERT INTO dim_user (user_id, type, username, first_name, last_name, joined_at) "
            "VALUES (%(id)s, %(type)s, %(username)s, %(first_name)s, %(last_name)s, %(created_at)s) "
            "ON CONFLICT (user_id) DO UPDATE SET type = EXCLUDED.type, username = EXCLUDED.username, "
            "first_name = EXCLUDED.first_name, last_name = EXCLUDED.last_name, loaded_at = now()",
            rows,
        )
    return len(rows)


async def forget_users(conn: AsyncConnection, ids: list[int]) -> dict[str, int]:
    """Remove deleted users' personal data.

    A customer's chats stay (their messages still count in their barber's aggregates)
    but lose the chat id and the customer's id. A barber disappears with everything
    that is theirs; their Elasticsearch documents are queued for deletion.
    """
    if not ids:
        return {"customers": 0, "barbers": 0}
    barbers = {
        r[0]
        for r in await (
            await conn.execute(
                "SELECT user_id FROM dim_user WHERE user_id = ANY(%s) AND type = 'employee' "
                "UNION SELECT barber_id FROM fact_chat WHERE barber_id = ANY(%s)",
                (ids, ids),
            )
        ).fetchall()
    }
    cur = await conn.execute(
        "UPDATE fact_chat SET customer_id = NULL, chat_id = NULL, customer_deleted = true WHERE customer_id = ANY(%s)",
        (ids,),
    )
    customers = cur.rowcount
    if barbers:
        b = sorted(barbers)
        await conn.execute("DELETE FROM fact_message WHERE barber_id = ANY(%s)", (b,))
        await conn.execute("DELETE FROM fact_chat WHERE barber_id = ANY(%s)", (b,))
        await conn.execute("DELETE FROM fact_barber_day WHERE barber_id = ANY(%s)", (b,))
        await conn.execute(
            "INSERT INTO es_pending_delete (barber_id) SELECT unnest(%s::bigint[]) ON CONFLICT DO NOTHING", (b,)
        )
    await conn.execute("DELETE FROM dim_user WHERE user_id = ANY(%s)", (ids,))
    return {"customers": customers, "barbers": len(barbers)}


# -- chats -----------------------------------------------------------------------------
async def upsert_chats(conn: AsyncConnection, chats: pd.DataFrame) -> int:
    """New chats (a chat's parties and start never change); returns how many were new."""
    if chats.empty:
        return 0
    cur = await conn.execute(
        f"""WITH new AS (
              INSERT INTO fact_chat (chat_id, barber_id, customer_id, started_at, started_day)
              SELECT chat_id, employee_id, customer_id, to_timestamp(created_at), {_DAY.format("created_at")}
              FROM unnest(%s::text[], %s::bigint[], %s::bigint[], %s::float8[])
                   AS t(chat_id, customer_id, employee_id, created_at)
              ON CONFLICT (chat_id) DO NOTHING
              RETURNING chat_key, barber_id, started_day)
            , aff AS (INSERT INTO tmp_affected (barber_id, day) SELECT DISTINCT barber_id, started_day FROM new
                      ON CONFLICT DO NOTHING)
            SELECT count(*) FROM new""",
        (
            chats["chat_id"].tolist(),
            chats["customer_id"].tolist(),
            chats["employee_id"].tolist(),
            chats["created_at"].tolist(),
        ),
    )
    row = await cur.fetchone()
    return int(row[0]) if row else 0


async def chat_keys(conn: AsyncConnection, chat_ids: list[str]) -> pd.DataFrame:
    cur = await conn.execute(
        "SELECT chat_id, chat_key, barber_id, customer_id FROM fact_chat WHERE chat_id = ANY(%s)", (chat_ids,)
    )
    return pd.DataFrame.from_records(await cur.fetchall(), columns=["chat_id", "chat_key", "barber_id", "customer_id"])


# -- messages --------------------------------------------------------------------------
async def already_loaded(conn: AsyncConnection, keys: pd.DataFrame) -> set[tuple[int, int]]:
    """Which (chat_key, seq) of ``keys`` are stored (messages re-read in the late window)."""
    if keys.empty:
        return set()
    cur = await conn.execute(
        "SELECT m.chat_key, m.seq FROM fact_message m "
        "JOIN unnest(%s::bigint[], %s::int[]) AS k(chat_key, seq) USING (chat_key, seq)",
        (keys["chat_key"].tolist(), keys["seq"].tolist()),
    )
    return {(r[0], r[1]) for r in await cur.fetchall()}


async def working_set(conn: AsyncConnection, new: pd.DataFrame) -> pd.DataFrame:
    """The stored messages whose reply the batch ``new`` may change (see _WORKING_SET)."""
    first = new.groupby("chat_key", sort=False)["seq"].min()
    cur = await conn.execute(_WORKING_SET, (first.index.tolist(), first.tolist()))
    stored = pd.DataFrame.from_records(
        await cur.fetchall(), columns=["chat_key", "seq", "barber_id", "sender_role", "sent_us"]
    )
    return stored


async def upsert_messages(conn: AsyncConnection, work: pd.DataFrame) -> int:
    """Upsert the transformed working set; records the touched chats and days."""
    if work.empty:
        return 0
    await conn.execute("TRUNCATE tmp_in")
    cols = ["chat_key", "seq", "barber_id", "sender_role", "sent_us", "reply_seq", "reply_us", "reply_s"]
    buf = io.StringIO()
    work[cols].to_csv(buf, header=False, index=False, float_format="%.6f")
    async with conn.cursor() as cur:
        async with cur.copy(f"COPY tmp_in ({', '.join(cols)}) FROM STDIN WITH (FORMAT csv)") as copy:
            await copy.write(buf.getvalue())
    # Temporary tables have no statistics: without them the planner would hash-join the
    # whole fact table instead of probing its index once per batch row.
    await conn.execute("ANALYZE tmp_in")
    await conn.execute(_AFFECTED_BY_BATCH)
    await conn.execute(_UPSERT_MESSAGES)
    await conn.execute("INSERT INTO tmp_touched SELECT DISTINCT chat_key FROM tmp_in ON CONFLICT DO NOTHING")
    return len(work)


async def finish(conn: AsyncConnection, run_id: int) -> int:
    """Recompute the per-chat facts and the touched (barber, day) rows; returns how many days."""
    await conn.execute("ANALYZE tmp_touched, tmp_affected")
    await conn.execute(_REFRESH_CHATS)
    await conn.execute(_REFRESH_DAYS, {"run_id": run_id})
    await conn.execute(_DROP_EMPTY_DAYS)
    row = await (await conn.execute("SELECT count(*) FROM tmp_affected")).fetchone()
    return int(row[0]) if row else 0
