"""elk.analytics.AnalyticsIndexer against the test suite's Elasticsearch (tests/esfake.py):
bulk actions and ids, overwrite on re-run, retries with backoff on 429/503 that never
index a document twice, failures raised as IndexingError, deleting a barber's documents."""

from __future__ import annotations

import base64
import datetime as dt
from collections.abc import AsyncIterator
from typing import Any

import pytest

from elk.analytics import AnalyticsIndexer, IndexingError
from elk.templates import ANALYTICS_FIELDS, ANALYTICS_INDEX, flatten_properties, properties
from tests.esfake import FakeElastic, fake  # noqa: F401 (the fixture)

pytestmark = pytest.mark.unit

BACKOFF_S = 0.2


@pytest.fixture
async def indexer(fake: FakeElastic) -> AsyncIterator[AnalyticsIndexer]:
    ix = AnalyticsIndexer(fake.es_url, max_retries=3, initial_backoff_s=BACKOFF_S, max_backoff_s=1.0)
    try:
        yield ix
    finally:
        await ix.close()


def rows(barbers: tuple[int, ...] = (7, 9), days: int = 3, run_id: int = 1) -> list[dict[str, Any]]:
    start = dt.date(2026, 11, 1)
    out = []
    for b in barbers:
        for d in range(days):
            out.append(
                {
                    "barber_id": b,
                    "username": f"barber{b}",
                    "first_name": "Ann",
                    "last_name": f"B{b}",
                    "day": start + dt.timedelta(days=d),
                    "chats_started": d,
                    "new_customers": 1,
                    "returning_customers": 0,
                    "customer_messages": 10 + d,
                    "barber_messages": 8,
                    "replies": 5,
                    "reply_time_median_s": 30.5 if d else float("nan"),
                    "reply_time_p90_s": 90.0 if d else None,
                    "unanswered_chats": 0,
                    "run_id": run_id,
                }
            )
    return out


def expected_ids(rs: list[dict[str, Any]]) -> set[str]:
    return {f"{r['barber_id']}:{r['day'].isoformat()}" for r in rs}


def bulk_requests(fake: FakeElastic) -> list[Any]:
    return fake.matching("(POST|PUT)", r"(/[^/]+)?/_bulk")


def action_ids(request: Any) -> list[str]:
    lines = request.ndjson()
    return [line["index"]["_id"] for line in lines if "index" in line]


async def test_one_document_per_barber_day_with_its_id(fake: FakeElastic, indexer: AnalyticsIndexer) -> None:
    rs = rows()
    assert await indexer.index_days(rs) == len(rs)
    (req,) = bulk_requests(fake)
    lines = req.ndjson()
    assert lines[0] == {"index": {"_index": ANALYTICS_INDEX, "_id": "7:2026-11-01"}}
    assert sorted(action_ids(req)) == sorted(expected_ids(rs))
    docs = fake.docs(ANALYTICS_INDEX)
    assert set(docs) == expected_ids(rs)
    doc = docs["9:2026-11-02"]["_source"]
    assert doc["barber"] == {"id": 9, "username": "barber9", "first_name": "Ann", "last_name": "B9"}
    assert doc["day"] == "2026-11-02" and doc["@timestamp"] == "2026-11-02T00:00:00Z"
    assert doc["customer_messages"] == 11 and doc["reply_time_median_s"] == 30.5 and doc["etl"] == {"run_id": 1}
    # No replies that day: null, never NaN (which is not JSON).
    assert docs["9:2026-11-01"]["_source"]["reply_time_median_s"] is None
    assert docs["9:2026-11-01"]["_source"]["reply_time_p90_s"] is None


def test_documents_fit_the_strict_analytics_mapping() -> None:
    from elk.analytics import document

    mapped = flatten_properties(properties(ANALYTICS_FIELDS))

    def leaves(node: dict[str, Any], prefix: str = "") -> set[str]:
        out: set[str] = set()
        for k, v in node.items():
            out |= leaves(v, f"{prefix}{k}.") if isinstance(v, dict) else {prefix + k}
        return out

    # dynamic: strict would refuse a document with any field the template does not map.
    assert leaves(document(rows()[1])) == set(mapped)


async def test_a_rerun_overwrites_never_duplicates(fake: FakeElastic, indexer: AnalyticsIndexer) -> None:
    await indexer.index_days(rows(run_id=1))
    again = rows(run_id=2)
    again[0]["customer_messages"] = 99
    assert await indexer.index_days(again) == len(again)
    docs = fake.docs(ANALYTICS_INDEX)
    assert set(docs) == expected_ids(again)
    assert {d["_version"] for d in docs.values()} == {2}
    assert docs["7:2026-11-01"]["_source"]["customer_messages"] == 99
    assert {d["_source"]["etl"]["run_id"] for d in docs.values()} == {2}


async def test_whole_request_429_is_retried_after_a_backoff(fake: FakeElastic, indexer: AnalyticsIndexer) -> None:
    fake.fail("POST|PUT", r"(/[^/]+)?/_bulk", 429, times=2)
    rs = rows()
    assert await indexer.index_days(rs) == len(rs)
    reqs = bulk_requests(fake)
    assert [r.status for r in reqs] == [429, 429, 200]
    assert all(sorted(action_ids(r)) == sorted(expected_ids(rs)) for r in reqs)
    # Exponential backoff: at least initial, then at least twice that, between attempts.
    assert reqs[1].at - reqs[0].at >= BACKOFF_S
    assert reqs[2].at - reqs[1].at >= 2 * BACKOFF_S
    assert set(fake.docs(ANALYTICS_INDEX)) == expected_ids(rs)


async def test_503_after_applying_is_retried_and_indexes_nothing_twice(
    fake: FakeElastic, indexer: AnalyticsIndexer
) -> None:
    # Elasticsearch applied the bulk but the answer was an error (say, a proxy's 503): the
    # retry sends the same ids again, so the documents are overwritten, not added.
    fake.fail("POST|PUT", r"(/[^/]+)?/_bulk", 503, times=1, apply=True)
    rs = rows()
    assert await indexer.index_days(rs) == len(rs)
    assert [r.status for r in bulk_requests(fake)] == [503, 200]
    docs = fake.docs(ANALYTICS_INDEX)
    assert set(docs) == expected_ids(rs) and len(docs) == len(rs)
    assert {d["_version"] for d in docs.values()} == {2}


async def test_only_the_refused_items_are_sent_again(fake: FakeElastic, indexer: AnalyticsIndexer) -> None:
    rs = rows()
    refused = ["7:2026-11-02", "9:2026-11-03"]
    fake.reject_items(refused, times=1)
    assert await indexer.index_days(rs) == len(rs)
    first, second = bulk_requests(fake)
    assert sorted(action_ids(first)) == sorted(expected_ids(rs))
    assert sorted(action_ids(second)) == sorted(refused)
    assert second.at - first.at >= BACKOFF_S
    docs = fake.docs(ANALYTICS_INDEX)
    assert set(docs) == expected_ids(rs) and {d["_version"] for d in docs.values()} == {1}


async def test_persistent_unavailability_raises_indexing_error(fake: FakeElastic, indexer: AnalyticsIndexer) -> None:
    fake.fail("POST|PUT", r"(/[^/]+)?/_bulk", 503, times=10)
    with pytest.raises(IndexingError, match="bulk request failed"):
        await indexer.index_days(rows())
    assert len(bulk_requests(fake)) == 1 + 3  # the first try and max_retries more
    assert fake.docs(ANALYTICS_INDEX) == {}


async def test_items_refused_for_good_raise_indexing_error(fake: FakeElastic, indexer: AnalyticsIndexer) -> None:
    fake.reject_items(["7:2026-11-01"], times=10)
    with pytest.raises(IndexingError, match="1 document"):
        await indexer.index_days(rows())
    # The others are in: the next run sends everything again and overwrites them.
    assert len(fake.docs(ANALYTICS_INDEX)) == len(rows()) - 1


async def test_delete_barbers_removes_only_their_documents(fake: FakeElastic, indexer: AnalyticsIndexer) -> None:
    assert await indexer.delete_barbers([7]) == 0  # no index yet: nothing to delete, no error
    await indexer.index_days(rows(barbers=(7, 9, 11)))
    assert await indexer.delete_barbers([7, 11]) == 6
    (req,) = fake.matching("POST", f"/{ANALYTICS_INDEX}/_delete_by_query")[-1:]
    assert req.json() == {"query": {"terms": {"barber.id": [7, 11]}}}
    assert req.query["conflicts"] == "proceed" and req.query["refresh"] == "true"
    assert {k.split(":")[0] for k in fake.docs(ANALYTICS_INDEX)} == {"9"}
    assert await indexer.delete_barbers([]) == 0


async def test_delete_retries_503(fake: FakeElastic, indexer: AnalyticsIndexer) -> None:
    await indexer.index_days(rows())
    fake.fail("POST", f"/{ANALYTICS_INDEX}/_delete_by_query", 503, times=1)
    assert await indexer.delete_barbers([9]) == 3
    assert [r.status for r in fake.matching("POST", f"/{ANALYTICS_INDEX}/_delete_by_query")] == [503, 200]


async def test_credentials_come_from_the_environment(fake: FakeElastic, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ELASTICSEARCH_API_KEY", "kid:secret")  # as Filebeat takes it: id:key
    ix = AnalyticsIndexer(fake.es_url)
    try:
        assert await ix.index_days(rows(days=1)) == 2
    finally:
        await ix.close()
    (req,) = bulk_requests(fake)
    assert req.headers["Authorization"] == "ApiKey " + base64.b64encode(b"kid:secret").decode()


async def test_delete_before_run_removes_what_a_full_refresh_did_not_rewrite(
    fake: FakeElastic, indexer: AnalyticsIndexer
) -> None:
    await indexer.index_days(rows(barbers=(7, 9), run_id=3))
    refreshed = rows(barbers=(9,), run_id=5)  # a full refresh: barber 7's days are gone from the source
    await indexer.index_days(refreshed)
    assert await indexer.delete_before_run(5) == 3
    (req,) = fake.matching("POST", f"/{ANALYTICS_INDEX}/_delete_by_query")
    assert req.json() == {"query": {"range": {"etl.run_id": {"lt": 5}}}}
    assert set(fake.docs(ANALYTICS_INDEX)) == expected_ids(refreshed)
