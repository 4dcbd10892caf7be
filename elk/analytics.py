"""The ETL's per-barber daily rows, indexed into Elasticsearch for the Kibana dashboard.

One document per barber and day, ``_id = "<barber_id>:<day>"``: a re-run, or a retry of a
bulk request that Elasticsearch had in fact applied, overwrites the same documents and
never adds a second copy. Overload answers (429, 503) are retried by the bulk helper with
exponential backoff, and only for the actions that were refused; anything still failing
after that raises :class:`IndexingError`, which the ETL records and retries next run.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

from elasticsearch import ApiError, AsyncElasticsearch, TransportError
from elasticsearch.helpers import async_bulk

from common.config import load_settings
from elk.settings import ElkSettings
from elk.templates import ANALYTICS_INDEX, ANALYTICS_METRICS

# Statuses that mean "overloaded or briefly unavailable, try again": the bulk helper
# backs off (initial_backoff, doubling, capped) and resends only what was refused.
RETRY_STATUS = (429, 503)


class IndexingError(Exception):
    """Indexing or deleting analytics documents failed after the retries."""


def _day(value: dt.date | str) -> str:
    if isinstance(value, dt.datetime):
        return value.date().isoformat()
    if isinstance(value, dt.date):
        return value.isoformat()
    return dt.date.fromisoformat(str(value)).isoformat()


def doc_id(barber_id: int, day: dt.date | str) -> str:
    return f"{int(barber_id)}:{_day(day)}"


def _number(value: Any) -> float | None:
    # pandas hands over NaN for "no replies that day"; JSON has null for it.
    if value is None:
        return None
    number = float(value)
    return None if number != number else number


def document(row: Mapping[str, Any]) -> dict[str, Any]:
    day = _day(row["day"])
    return {
        "@timestamp": f"{day}T00:00:00Z",
        "day": day,
        "barber": {
            "id": int(row["barber_id"]),
            "username": row.get("username"),
            "first_name": row.get("first_name"),
            "last_name": row.get("last_name"),
        },
        **{m: int(row.get(m) or 0) for m in ANALYTICS_METRICS},
        "reply_time_median_s": _number(row.get("reply_time_median_s")),
        "reply_time_p90_s": _number(row.get("reply_time_p90_s")),
        "etl": {"run_id": int(row["run_id"]) if row.get("run_id") is not None else None},
    }


class AnalyticsIndexer:
    def __init__(
        self,
        url: str,
        *,
        index: str = ANALYTICS_INDEX,
        max_retries: int = 4,
        initial_backoff_s: float = 0.5,
        max_backoff_s: float = 10.0,
        chunk_size: int = 500,
        **client_kwargs: Any,
    ) -> None:
        self.index = index
        self.max_retries = max_retries
        self.initial_backoff_s = initial_backoff_s
        self.max_backoff_s = max_backoff_s
        self.chunk_size = chunk_size
        # 429/503 are the bulk helper's to retry (with backoff, refused actions only), so
        # the transport retries only gateway errors and lost connections itself.
        client_kwargs.setdefault("retry_on_status", (502, 504))
        client_kwargs.setdefault("max_retries", 3)
        client_kwargs.setdefault("retry_on_timeout", True)
        client_kwargs.setdefault("request_timeout", 30)
        if not {"api_key", "basic_auth", "bearer_auth"} & set(client_kwargs):
            # The cluster's credentials, from the same variables as `python -m elk setup`.
            for key, value in load_settings(ElkSettings).client_kwargs().items():
                client_kwargs.setdefault(key, value)
        self.client = AsyncElasticsearch(url, **client_kwargs)

    def _actions(self, rows: Iterable[Mapping[str, Any]]) -> Iterator[dict[str, Any]]:
        for row in rows:
            yield {
                "_op_type": "index",
                "_index": self.index,
                "_id": doc_id(row["barber_id"], row["day"]),
                "_source": document(row),
            }

    async def index_days(self, rows: Iterable[Mapping[str, Any]]) -> int:
        """Index one document per row (id barber:day); the number indexed."""
        try:
            # raise_on_error=False: with it on, the helper raises at the first refused item
            # instead of retrying it; the items still refused after the retries come back.
            ok, errors = await async_bulk(
                self.client,
                self._actions(rows),
                chunk_size=self.chunk_size,
                raise_on_error=False,
                max_retries=self.max_retries,
                initial_backoff=self.initial_backoff_s,
                max_backoff=self.max_backoff_s,
                retry_on_status=RETRY_STATUS,
            )
        except (ApiError, TransportError) as e:
            raise IndexingError(f"bulk request failed: {e}") from e
        if errors:
            assert isinstance(errors, list)
            first = next(iter(errors[0].values()))
            raise IndexingError(
                f"{len(errors)} document(s) not indexed; first: {first.get('_id')} "
                f"{first.get('status')} {first.get('error')}"
            )
        return ok

    async def delete_barbers(self, barber_ids: Iterable[int]) -> int:
        """Delete every document of these barbers (their personal data); the number deleted."""
        ids = sorted({int(i) for i in barber_ids})
        if not ids:
            return 0
        return await self._delete({"terms": {"barber.id": ids}}, f"the documents of barbers {ids}")

    async def delete_before_run(self, run_id: int) -> int:
        """After a full refresh has indexed every barber-day again (each document now carries
        ``run_id``): delete the older ones, days the warehouse no longer holds; the number deleted."""
        return await self._delete(
            {"range": {"etl.run_id": {"lt": int(run_id)}}}, f"the documents written before run {run_id}"
        )

    async def _delete(self, query: dict[str, Any], what: str) -> int:
        try:
            resp = await self.client.options(
                retry_on_status=(429, 502, 503, 504), retry_backoff_base=0.5, retry_backoff_cap=5.0
            ).delete_by_query(
                index=self.index,
                query=query,
                conflicts="proceed",
                refresh=True,
                ignore_unavailable=True,
            )
        except (ApiError, TransportError) as e:
            raise IndexingError(f"deleting {what} failed: {e}") from e
        if resp.get("failures"):
            raise IndexingError(f"deleting {what} failed: {resp['failures'][:1]}")
        return int(resp.get("deleted", 0))

    async def close(self) -> None:
        await self.client.close()
