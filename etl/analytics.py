"""The analytics queries behind the API, over the warehouse (a replica when one is fresh).

A period's figures are computed from the facts, not by adding up days where that would
be wrong: reply-time median and p90 are exact over the period's replies
(``percentile_cont`` over ``fact_message``), returning customers and unanswered chats are
distinct chats over the period. Definitions: docs/etl.md.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from typing import Any

from sqlalchemy import text

from common.errors import BadRequest, NotFound
from replicas import ReadWriteRouter

METRICS = (
    "chats_started",
    "new_customers",
    "returning_customers",
    "customer_messages",
    "barber_messages",
    "replies",
    "reply_time_median_s",
    "reply_time_p90_s",
    "unanswered_chats",
)
SORT_KEYS = (*METRICS, "barber_id", "username", "first_name", "last_name")
MAX_RANGE_DAYS = 366
DEFAULT_DAYS = 30


@dataclass(frozen=True)
class Period:
    start: date
    end: date

    @property
    def days(self) -> int:
        return (self.end - self.start).days + 1


def _day(name: str, raw: str | None) -> date | None:
    if raw is None or raw == "":
        return None
    try:
        if len(raw) != 10:
            raise ValueError(raw)
        return date.fromisoformat(raw)
    except ValueError as e:
        raise BadRequest(f"{name}: must be a date YYYY-MM-DD") from e


def parse_period(raw_from: str | None, raw_to: str | None, today: date | None = None) -> Period:
    """``to`` defaults to today (UTC), ``from`` to 29 days before ``to``."""
    end = _day("to", raw_to) or today or datetime.now(UTC).date()
    start = _day("from", raw_from) or end - timedelta(days=DEFAULT_DAYS - 1)
    if start > end:
        raise BadRequest("from: must not be after to")
    if (end - start).days + 1 > MAX_RANGE_DAYS:
        raise BadRequest(f"the range may span at most {MAX_RANGE_DAYS} days")
    return Period(start, end)


def parse_sort(sort: str | None, order: str | None) -> tuple[str, str]:
    sort = sort or "customer_messages"
    order = (order or "desc").lower()
    if sort not in SORT_KEYS:
        raise BadRequest(f"sort: must be one of {', '.join(SORT_KEYS)}")
    if order not in ("asc", "desc"):
        raise BadRequest("order: must be asc or desc")
    return sort, order


_LEADERBOARD = """
WITH b AS (SELECT user_id AS barber_id, username, first_name, last_name FROM dim_user WHERE type = 'employee'),
d AS (SELECT barber_id, sum(chats_started) AS chats_started, sum(new_customers) AS new_customers,
             sum(customer_messages) AS customer_messages, sum(barber_messages) AS barber_messages
      FROM fact_barber_day WHERE day BETWEEN :start AND :end GROUP BY barber_id),
r AS (SELECT barber_id, count(*) AS replies,
             percentile_cont(0.5) WITHIN GROUP (ORDER BY reply_s) AS reply_time_median_s,
             percentile_cont(0.9) WITHIN GROUP (ORDER BY reply_s) AS reply_time_p90_s
      FROM fact_message WHERE reply_day BETWEEN :start AND :end GROUP BY barber_id),
m AS (SELECT fm.barber_id,
             count(DISTINCT fm.chat_key) FILTER (WHERE c.started_day < :start) AS returning_customers,
             count(DISTINCT fm.chat_key) FILTER (WHERE fm.reply_day IS NULL OR fm.reply_day > :end)
                 AS unanswered_chats
      FROM fact_message fm JOIN fact_chat c USING (chat_key)
      WHERE fm.sender_role = 'customer' AND fm.day BETWEEN :start AND :end
      GROUP BY fm.barber_id)
SELECT b.barber_id, b.username, b.first_name, b.last_name,
       COALESCE(d.chats_started, 0)::int AS chats_started, COALESCE(d.new_customers, 0)::int AS new_customers,
       COALESCE(m.returning_customers, 0)::int AS returning_customers,
       COALESCE(d.customer_messages, 0)::int AS customer_messages,
       COALESCE(d.barber_messages, 0)::int AS barber_messages, COALESCE(r.replies, 0)::int AS replies,
       r.reply_time_median_s, r.reply_time_p90_s, COALESCE(m.unanswered_chats, 0)::int AS unanswered_chats,
       count(*) OVER () AS total
FROM b LEFT JOIN d USING (barber_id) LEFT JOIN r USING (barber_id) LEFT JOIN m USING (barber_id)
"""

_BARBER = "SELECT user_id AS barber_id, username, first_name, last_name FROM dim_user WHERE user_id = :id AND type = 'employee'"

_DAILY = """
SELECT g.day::date AS day,
       COALESCE(d.chats_started, 0) AS chats_started, COALESCE(d.new_customers, 0) AS new_customers,
       COALESCE(d.returning_customers, 0) AS returning_customers,
       COALESCE(d.customer_messages, 0) AS customer_messages, COALESCE(d.barber_messages, 0) AS barber_messages,
       COALESCE(d.replies, 0) AS replies, d.reply_time_median_s, d.reply_time_p90_s,
       COALESCE(d.unanswered_chats, 0) AS unanswered_chats
FROM generate_series(CAST(:start AS date), CAST(:end AS date), interval '1 day') AS g(day)
LEFT JOIN fact_barber_day d ON d.barber_id = :id AND d.day = g.day::date
ORDER BY g.day
"""


def _row(mapping: Any) -> dict[str, Any]:
    out = dict(mapping)
    out.pop("total", None)
    if isinstance(out.get("day"), date):
        out["day"] = out["day"].isoformat()
    return out


async def leaderboard(
    router: ReadWriteRouter, period: Period, sort: str, order: str, limit: int, offset: int
) -> dict[str, Any]:
    # sort and order are checked against fixed lists (parse_sort), never free text.
    sql = _LEADERBOARD + f" ORDER BY {sort} {order.upper()} NULLS LAST, b.barber_id LIMIT :limit OFFSET :offset"
    params = {"start": period.start, "end": period.end, "limit": limit, "offset": offset}

    async def read(conn: Any) -> list[Any]:
        return list((await conn.execute(text(sql), params)).mappings())

    rows = await router.read(read)
    total = int(rows[0]["total"]) if rows else 0
    if not rows and offset > 0:  # past the end: count the barbers all the same

        async def count(conn: Any) -> int:
            return int((await conn.execute(text("SELECT count(*) FROM dim_user WHERE type = 'employee'"))).scalar_one())

        total = await router.read(count)
    return {
        "from": period.start.isoformat(),
        "to": period.end.isoformat(),
        "sort": sort,
        "order": order,
        "limit": limit,
        "offset": offset,
        "total": total,
        "barbers": [_row(r) for r in rows],
    }


async def daily(router: ReadWriteRouter, barber_id: int, period: Period) -> dict[str, Any]:
    params = {"id": barber_id, "start": period.start, "end": period.end}

    async def read(conn: Any) -> tuple[Any, list[Any]]:
        barber = (await conn.execute(text(_BARBER), params)).mappings().first()
        if barber is None:
            return None, []
        return dict(barber), list((await conn.execute(text(_DAILY), params)).mappings())

    barber, days = await router.read(read)
    if barber is None:
        raise NotFound(f"no barber {barber_id} in the analytics")
    return {
        "barber": barber,
        "from": period.start.isoformat(),
        "to": period.end.isoformat(),
        "days": [_row(d) for d in days],
    }
