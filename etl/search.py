"""After a committed run: index the changed per-barber daily rows into Elasticsearch
(for Kibana) through ``elk.analytics.AnalyticsIndexer``, and delete deleted barbers'
documents. Off unless ``ELASTICSEARCH_URL`` is set.

Durable: a row stays ``es_pending`` (and a deleted barber in ``es_pending_delete``)
until Elasticsearch acknowledged it, so a failed indexing is retried by the next run.
A failure never touches the warehouse load; it is recorded in the run record.
"""

from __future__ import annotations

import logging
from typing import Any

from psycopg import AsyncConnection
from psycopg.rows import dict_row

from etl.settings import EtlSettings

log = logging.getLogger("barber.etl.search")

PAGE = 5000

_PENDING = """
SELECT d.barber_id, u.username, u.first_name, u.last_name, d.day, d.chats_started, d.new_customers,
       d.returning_customers, d.customer_messages, d.barber_messages, d.replies, d.reply_time_median_s,
       d.reply_time_p90_s, d.unanswered_chats, d.run_id
FROM fact_barber_day d JOIN dim_user u ON u.user_id = d.barber_id
WHERE d.es_pending AND (d.barber_id, d.day) > (%s, %s::date)
ORDER BY d.barber_id, d.day LIMIT %s
"""


async def index_pending(
    settings: EtlSettings, conn: AsyncConnection, run_id: int, full_refresh: bool = False
) -> tuple[int, str | None]:
    """(documents indexed, error or None)."""
    if not settings.elasticsearch_url:
        return 0, None
    try:
        from elk.analytics import AnalyticsIndexer  # written alongside; imported only when used
    except ImportError as e:
        log.error("ELASTICSEARCH_URL is set but elk.analytics cannot be imported: %s", e)
        return 0, f"elk.analytics unavailable: {e}"
    indexer = AnalyticsIndexer(settings.elasticsearch_url, index=settings.elasticsearch_index)
    indexed = 0
    try:
        after: tuple[int, Any] = (-1, "0001-01-01")
        while True:
            async with conn.cursor(row_factory=dict_row) as cur:
                await cur.execute(_PENDING, (*after, PAGE))
                rows = await cur.fetchall()
            if not rows:
                break
            indexed += await indexer.index_days(rows)
            await conn.execute(
                "UPDATE fact_barber_day d SET es_pending = false FROM unnest(%s::bigint[], %s::date[]) AS k(b, day) "
                "WHERE d.barber_id = k.b AND d.day = k.day",
                ([r["barber_id"] for r in rows], [r["day"] for r in rows]),
            )
            after = (rows[-1]["barber_id"], rows[-1]["day"])
        if full_refresh:
            # Every barber-day was indexed again by this run: what older runs wrote and this
            # one did not is a day the warehouse no longer holds.
            await indexer.delete_before_run(run_id)
        gone = [r[0] for r in await (await conn.execute("SELECT barber_id FROM es_pending_delete")).fetchall()]
        if gone:
            await indexer.delete_barbers(gone)
            await conn.execute("DELETE FROM es_pending_delete WHERE barber_id = ANY(%s)", (gone,))
        log.info(
            "run %d indexed %d daily rows into Elasticsearch",
            run_id,
            indexed,
            extra={
                "event.action": "etl-index",
                "event.outcome": "success",
                "barber.etl.run_id": run_id,
                "barber.etl.indexed": indexed,
            },
        )
        return indexed, None
    except Exception as e:  # IndexingError or a transport error: retried by the next run
        log.error(
            "run %d: Elasticsearch indexing failed after %d documents: %s",
            run_id,
            indexed,
            e,
            extra={
                "event.action": "etl-index",
                "event.outcome": "failure",
                "barber.etl.run_id": run_id,
                "barber.etl.indexed": indexed,
                "error.type": type(e).__name__,
            },
        )
        return indexed, f"{type(e).__name__}: {e}"
    finally:
        await indexer.close()
