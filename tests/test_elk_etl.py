"""The ETL → Elasticsearch path end to end: `python -m etl run` against the stack with
ELASTICSEARCH_URL at the test suite's Elasticsearch (tests/esfake.py). Barber-day
documents with id barber:day, none twice after a re-run, an outage that fails nothing and
is caught up by the next run, a deleted barber's documents removed."""

from __future__ import annotations

import asyncio
import json
import os
import sys
from datetime import UTC, datetime
from typing import Any

from elk.templates import ANALYTICS_INDEX, get_field, mapping_problems
from tests.esfake import FakeElastic, fake  # noqa: F401 (the fixture)
from tests.etl_support import warehouse
from tests.http import call
from tests.stackproc import ROOT, StackProcess
from tests.test_coordinator import delete, make_party

BUSY = 3  # `python -m etl run`: another run holds the lock


async def etl_run(stack: StackProcess, es_url: str, *args: str, timeout: float = 240) -> list[dict[str, Any]]:
    """One `python -m etl run`, waiting out a run the stack's scheduler holds; its ECS log
    lines, each checked against the logs template."""
    env = {**os.environ, **stack.env, "ELASTICSEARCH_URL": es_url}
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "etl",
            "run",
            *args,
            cwd=ROOT,
            env=env,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        out, err = await asyncio.wait_for(proc.communicate(), timeout)
        if proc.returncode != BUSY or loop.time() > deadline:
            assert proc.returncode == 0, err.decode()[-2000:]
            events = [json.loads(line) for line in out.decode().splitlines() if line.startswith("{")]
            problems = [p for e in events for p in mapping_problems(e)]
            assert problems == [], problems
            return events
        await asyncio.sleep(0.5)


def assert_in_step(stack: StackProcess, docs: dict[str, Any], complete: bool) -> None:
    """The documents agree with the warehouse: each is a barber-day it holds, unless its
    barber's deletion is still to be sent; and (``complete``: after a full refresh into
    this Elasticsearch) every barber-day not waiting to be indexed is there. The stack's
    own ETL (no Elasticsearch) may run meanwhile: what it changes waits as pending."""
    with warehouse(stack) as conn:
        rows = conn.execute("SELECT barber_id, day, es_pending FROM fact_barber_day").fetchall()
        gone = {b for (b,) in conn.execute("SELECT barber_id FROM es_pending_delete")}
    facts = {f"{b}:{d.isoformat()}" for b, d, _ in rows}
    stray = {i for i in set(docs) - facts if int(i.split(":")[0]) not in gone}
    assert stray == set(), stray
    if complete:
        missing = {f"{b}:{d.isoformat()}" for b, d, pending in rows if not pending} - set(docs)
        assert missing == set(), missing


async def test_runs_index_barber_days_once_each(stack: StackProcess, fake: FakeElastic) -> None:
    party = await make_party(stack, chats=1, messages=3)
    barber = party.others[0]
    today = datetime.now(UTC).date().isoformat()
    events = await etl_run(stack, fake.es_url)
    docs = fake.docs(ANALYTICS_INDEX)
    (finished,) = [e for e in events if get_field(e, "event.action") == "etl-run"]
    assert get_field(finished, "barber.etl.state") == "succeeded" and get_field(finished, "event.duration") > 0
    assert get_field(finished, "barber.etl.rows.loaded") >= 1
    (indexed,) = [e for e in events if get_field(e, "event.action") == "etl-index"]
    assert get_field(indexed, "barber.etl.indexed") == len(docs)
    mine = docs[f"{barber.id}:{today}"]["_source"]
    assert mine["barber"] == {
        "id": barber.id,
        "username": barber.username,
        "first_name": barber.first_name,
        "last_name": barber.last_name,
    }
    assert mine["customer_messages"] == 3 and mine["chats_started"] == 1 and mine["day"] == today
    # Every action of every bulk request had a barber:day id, and each one came once.
    for req in fake.matching("POST|PUT", r"(/[^/]+)?/_bulk"):
        ids = [line["index"]["_id"] for line in req.ndjson() if "index" in line]
        assert ids and len(ids) == len(set(ids))
    assert_in_step(stack, docs, complete=False)

    # A full refresh recomputes and re-indexes everything: the same documents, overwritten.
    await etl_run(stack, fake.es_url, "--full-refresh")
    again = fake.docs(ANALYTICS_INDEX)
    assert_in_step(stack, again, complete=True)
    assert again[f"{barber.id}:{today}"]["_version"] == 2
    assert again[f"{barber.id}:{today}"]["_source"]["customer_messages"] == 3


async def test_an_outage_fails_nothing_and_the_next_run_catches_up(
    stack: StackProcess, fake: FakeElastic, admin_token: str
) -> None:
    party = await make_party(stack, chats=1, messages=2)
    key = f"{party.others[0].id}:{datetime.now(UTC).date().isoformat()}"
    fake.fail("POST|PUT", r"(/[^/]+)?/_bulk", 503, times=1000)
    events = await etl_run(stack, fake.es_url)  # exit 0: the warehouse load stands
    (failed,) = [e for e in events if get_field(e, "event.action") == "etl-index"]
    assert get_field(failed, "event.outcome") == "failure" and failed["log.level"] == "error"
    reply = await call("GET", stack.url("gateway") + "/etl/runs?limit=1", token=admin_token)
    assert reply.code == 200, reply
    (run,) = reply.json["runs"]
    assert run["state"] == "succeeded" and run["elasticsearch"]["error"], run
    assert key not in fake.docs(ANALYTICS_INDEX)

    fake.clear()  # Elasticsearch is back
    await etl_run(stack, fake.es_url)
    assert fake.docs(ANALYTICS_INDEX)[key]["_source"]["customer_messages"] == 2
    assert_in_step(stack, fake.docs(ANALYTICS_INDEX), complete=False)


async def test_a_deleted_barbers_documents_are_removed(
    stack: StackProcess, fake: FakeElastic, admin_token: str
) -> None:
    party = await make_party(stack, chats=1, messages=1)
    barber = party.others[0]
    await etl_run(stack, fake.es_url, "--full-refresh")
    assert any(k.startswith(f"{barber.id}:") for k in fake.docs(ANALYTICS_INDEX))
    assert (await delete(stack, admin_token, barber.id, "2pc")).code == 200
    await etl_run(stack, fake.es_url)
    assert not any(k.startswith(f"{barber.id}:") for k in fake.docs(ANALYTICS_INDEX))
    deletes = [r.json() for r in fake.matching("POST", f"/{ANALYTICS_INDEX}/_delete_by_query")]
    assert any(barber.id in d["query"]["terms"]["barber.id"] for d in deletes if "terms" in d["query"])
    assert_in_step(stack, fake.docs(ANALYTICS_INDEX), complete=True)
