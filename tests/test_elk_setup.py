"""`python -m elk setup` against the test suite's Elasticsearch/Kibana server (tests/esfake.py):
what it installs, that a second run writes nothing, that a change is written once."""

from __future__ import annotations

import asyncio
import base64
import os
import subprocess
import sys
from pathlib import Path

import pytest

from elk import templates as t
from elk.install import HASH_KEY, load_saved_objects, setup
from elk.settings import ElkSettings
from tests.esfake import FakeElastic, fake  # noqa: F401 (the fixture)

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parent.parent


def settings_for(fake: FakeElastic, **more: object) -> ElkSettings:
    return ElkSettings(elasticsearch_url=fake.es_url, kibana_url=fake.kibana_url, elk_wait_s=20, **more)


def es_writes(fake: FakeElastic) -> list[str]:
    """Writes that change something: every PUT, and every POST but the read-only _bulk_get."""
    return [f"{r.method} {r.path}" for r in fake.writes() if not r.path.endswith("/_bulk_get")]


async def test_first_setup_installs_everything(fake: FakeElastic) -> None:
    report = await setup(settings_for(fake, elk_log_retention_days=9, elk_replicas=0))
    objects = load_saved_objects()
    assert report.count("created") == 8 + len(objects) and report.count("unchanged") == 0

    # ILM: hot with rollover by size and age, then delete after the configured retention.
    (put,) = fake.matching("PUT", "/_ilm/policy/barber-logs")
    policy = put.json()["policy"]
    assert policy["phases"]["hot"]["actions"]["rollover"] == {"max_primary_shard_size": "10gb", "max_age": "1d"}
    assert policy["phases"]["delete"] == {"min_age": "9d", "actions": {"delete": {}}}

    # The logs index template: data streams logs-barber.*-*, above the built-in logs template.
    (put,) = fake.matching("PUT", "/_index_template/barber-logs")
    body = put.json()
    assert body["index_patterns"] == ["logs-barber.*-*"] and body["data_stream"] == {}
    assert body["priority"] > 100
    assert body["composed_of"] == ["barber-logs@settings", "barber-logs@ecs", "barber-logs@barber"]
    # Component templates were written before the index template that names them.
    paths = [r.path for r in fake.writes()]
    assert all(
        paths.index(f"/_component_template/{c}") < paths.index("/_index_template/barber-logs")
        for c in body["composed_of"]
    )

    settings = fake.state.component_templates["barber-logs@settings"]["template"]["settings"]["index"]
    assert settings["lifecycle"]["name"] == "barber-logs" and settings["default_pipeline"] == "barber-logs"
    assert settings["number_of_replicas"] == 0
    ecs = fake.state.component_templates["barber-logs@ecs"]["template"]["mappings"]
    assert ecs["dynamic"] is False
    props = ecs["properties"]
    assert props["http"]["properties"]["response"]["properties"]["status_code"]["type"] == "long"
    assert props["client"]["properties"]["ip"]["type"] == "ip"
    assert props["event"]["properties"]["duration"]["type"] == "long"
    assert props["message"]["type"] == "match_only_text"
    barber = fake.state.component_templates["barber-logs@barber"]["template"]["mappings"]["properties"]["barber"]
    flat = t.flatten_properties(barber["properties"], "barber.")
    for name in (
        "barber.route",
        "barber.upstream.instance",
        "barber.breaker.state",
        "barber.transaction.id",
        "barber.transaction.state",
        "barber.etl.run_id",
        "barber.etl.rows.loaded",
    ):
        assert name in flat
    assert flat["barber.etl.run_id"] == "long" and flat["barber.upstream.instance"] == "keyword"

    pipeline = fake.state.pipelines["barber-logs"]
    assert {"set", "lowercase"} <= {next(iter(p)) for p in pipeline["processors"]}

    analytics = fake.state.index_templates["barber-analytics"]
    assert analytics["index_patterns"] == ["barber-analytics-*"] and "data_stream" not in analytics
    amap = fake.state.component_templates["barber-analytics@mappings"]["template"]["mappings"]
    assert amap["dynamic"] == "strict"
    assert amap["properties"]["barber"]["properties"]["id"]["type"] == "long"

    # Every object carries the hash setup compares on the next run.
    for kind in (fake.state.component_templates, fake.state.index_templates, fake.state.pipelines):
        assert all(HASH_KEY in body["_meta"] for body in kind.values())
    assert HASH_KEY in fake.state.ilm["barber-logs"]["_meta"]

    # Kibana: every saved object imported, with the XSRF header Kibana requires.
    (imp,) = fake.matching("POST", "/api/saved_objects/_import")
    assert imp.query == {"overwrite": "true"} and imp.headers.get("kbn-xsrf") == "true"
    assert set(fake.state.saved_objects) == {(o["type"], o["id"]) for o in objects}


async def test_second_setup_changes_nothing(fake: FakeElastic) -> None:
    settings = settings_for(fake)
    await setup(settings)
    fake.clear()
    report = await setup(settings)
    assert not report.changed and report.count("unchanged") == len(report.items) > 8
    assert es_writes(fake) == []
    # It did look: every object was read back.
    assert len(fake.matching("GET", "/_component_template/.*")) == 4
    assert len(fake.matching("POST", "/api/saved_objects/_bulk_get")) == 1


async def test_a_changed_setting_rewrites_only_what_it_changes(fake: FakeElastic) -> None:
    await setup(settings_for(fake, elk_log_retention_days=14))
    fake.clear()
    report = await setup(settings_for(fake, elk_log_retention_days=30))
    assert es_writes(fake) == ["PUT /_ilm/policy/barber-logs"]
    assert ("ilm policy", "barber-logs", "updated") in report.items
    assert fake.state.ilm["barber-logs"]["phases"]["delete"]["min_age"] == "30d"
    assert fake.state.ilm_versions["barber-logs"] == 2


async def test_a_dashboard_edited_in_kibana_is_put_back(fake: FakeElastic) -> None:
    await setup(settings_for(fake))
    key = ("dashboard", "barber-dashboard-traffic")
    fake.state.saved_objects[key]["attributes"]["title"] = "someone renamed it"
    fake.clear()
    report = await setup(settings_for(fake))
    assert es_writes(fake) == ["POST /api/saved_objects/_import"]
    (imp,) = fake.matching("POST", "/api/saved_objects/_import")
    assert b'"barber-dashboard-traffic"' in imp.body and b'"barber-dashboard-etl"' not in imp.body
    assert report.count("updated") == 1
    assert fake.state.saved_objects[key]["attributes"]["title"] == "Barber: traffic"


async def test_setup_waits_for_the_cluster(fake: FakeElastic) -> None:
    # Not ready for a while: health answers 503 (and the client's own retries see it too).
    fake.fail("GET", "/_cluster/health", 503, times=6)
    report = await setup(settings_for(fake))
    assert report.count("created") > 0
    health = fake.matching("GET", "/_cluster/health")
    assert [r.status for r in health[:6]] == [503] * 6 and health[-1].status == 200


def run_cli(env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "elk", "setup"],
        cwd=ROOT,
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=120,
    )


async def test_cli_reports_created_then_unchanged(fake: FakeElastic) -> None:
    env = {"ELASTICSEARCH_URL": fake.es_url, "KIBANA_URL": fake.kibana_url, "ELK_WAIT_S": "20"}
    first = await asyncio.to_thread(run_cli, env)
    assert first.returncode == 0, first.stderr
    assert "index template       barber-logs" in first.stdout and "0 unchanged" in first.stdout
    second = await asyncio.to_thread(run_cli, env)
    assert second.returncode == 0, second.stderr
    assert "0 created, 0 updated" in second.stdout


async def test_cli_fails_clearly_when_elasticsearch_never_answers(fake: FakeElastic) -> None:
    fake.stop()  # nothing listens there any more
    result = await asyncio.to_thread(run_cli, {"ELASTICSEARCH_URL": fake.es_url, "KIBANA_URL": "", "ELK_WAIT_S": "1"})
    assert result.returncode == 1
    assert "Elasticsearch not ready after 1s" in result.stderr and "Traceback" not in result.stderr


async def test_cli_refuses_a_bad_setting() -> None:
    result = await asyncio.to_thread(run_cli, {"ELK_LOG_RETENTION_DAYS": "0"})
    assert result.returncode == 2 and "ELK_LOG_RETENTION_DAYS" in result.stderr


async def test_the_same_credentials_go_to_elasticsearch_and_kibana(fake: FakeElastic) -> None:
    await setup(settings_for(fake, elasticsearch_username="elastic", elasticsearch_password="pw"))
    expected = "Basic " + base64.b64encode(b"elastic:pw").decode()
    assert fake.requests and {r.headers.get("Authorization") for r in fake.requests} == {expected}
