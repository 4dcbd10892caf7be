"""The ELK files checked structurally: elk/filebeat.yml, the Kibana saved objects in
elk/kibana/, and the templates they both must agree with."""

from __future__ import annotations

import fnmatch
import json
import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from elk import kibana_objects
from elk import templates as t
from stack.services import SERVICES

pytestmark = pytest.mark.unit

ELK = Path(__file__).resolve().parent.parent / "elk"
ENV_REF = re.compile(r"\$\{(\w+)(?::([^}]*))?\}")
AGGREGATABLE = {"keyword", "constant_keyword", "long", "double", "date", "ip"}
NUMERIC = {"long", "double"}


def filebeat(env: dict[str, str] | None = None) -> dict[str, Any]:
    """elk/filebeat.yml as Filebeat reads it: ${VAR:default} resolved from ``env`` or defaults."""
    env = env or {}
    text = ENV_REF.sub(lambda m: env.get(m.group(1), m.group(2) or ""), (ELK / "filebeat.yml").read_text())
    return yaml.safe_load(text)


def dotted(node: dict[str, Any], key: str) -> Any:
    """Filebeat accepts both `a.b: x` and `a: {b: x}`."""
    if key in node:
        return node[key]
    head, _, rest = key.partition(".")
    return dotted(node[head], rest) if rest and isinstance(node.get(head), dict) else None


def truthy(value: Any) -> bool:
    return value is True or str(value).lower() == "true"


# -- templates ----------------------------------------------------------------------------
def test_templates_cover_every_data_stream_and_the_analytics_index() -> None:
    patterns = {name: body["index_patterns"] for name, body in t.index_templates().items()}
    for family in t.LOG_FAMILIES:
        assert fnmatch.fnmatchcase(t.data_stream(family), t.LOG_INDEX_PATTERN)
        assert not fnmatch.fnmatchcase(t.data_stream(family), t.ANALYTICS_INDEX_PATTERN)
    assert patterns[t.LOGS_TEMPLATE] == [t.LOG_INDEX_PATTERN]
    assert fnmatch.fnmatchcase(t.ANALYTICS_INDEX, patterns[t.ANALYTICS_TEMPLATE][0])
    components = t.component_templates(1)
    for body in t.index_templates().values():
        assert all(c in components for c in body["composed_of"])
    settings = components[t.LOGS_SETTINGS_COMPONENT]["template"]["settings"]["index"]
    assert settings["lifecycle"]["name"] == t.LOGS_ILM_POLICY and settings["default_pipeline"] == t.LOGS_PIPELINE


def test_mappings_round_trip_and_ecs_fields_do_not_clash_with_ours() -> None:
    assert t.flatten_properties(t.properties(t.log_fields())) == t.log_fields()
    assert not set(t.ECS_FIELDS) & set(t.BARBER_FIELDS)
    assert all(name.startswith("barber.") for name in t.BARBER_FIELDS)
    # A field cannot be both a leaf and an object.
    names = set(t.log_fields())
    assert not [n for n in names if any(o.startswith(n + ".") for o in names)]


# -- Filebeat ---------------------------------------------------------------------------
def test_filebeat_parses_ecs_json_as_is() -> None:
    cfg = filebeat()
    inputs = cfg["filebeat.inputs"]
    assert len({i["id"] for i in inputs}) == len(inputs)
    for inp in inputs:
        assert inp["type"] == "filestream"
        ndjson = [p["ndjson"] for p in inp["parsers"] if "ndjson" in p]
        assert len(ndjson) == 1, inp["id"]
        assert ndjson[0]["target"] == "" and ndjson[0]["expand_keys"] is True
        assert ndjson[0]["overwrite_keys"] is True and ndjson[0]["add_error_key"] is True
    containers = next(i for i in inputs if i["id"] == "barber-containers")
    assert not truthy(containers["enabled"])
    assert [next(iter(p)) for p in containers["parsers"]] == ["container", "ndjson"]
    assert truthy(filebeat({"BARBER_LOG_CONTAINERS": "true"})["filebeat.inputs"][-1]["enabled"])


def _service_of(inp: dict[str, Any]) -> str:
    (added,) = [p["add_fields"] for p in inp["processors"] if "add_fields" in p]
    assert added["target"] == "service" and dotted(added, "when.not.has_fields") == ["service.name"]
    return added["fields"]["name"]


def test_filebeat_reads_every_process_log_of_the_stack() -> None:
    cfg = filebeat({"BARBER_LOG_DIR": "/srv/logs"})
    files = [i for i in cfg["filebeat.inputs"] if truthy(i["enabled"])]
    assert {_service_of(i) for i in files} == set(t.LOG_FAMILIES)
    for spec in SERVICES:
        for process in spec.instance_names(1) + spec.instance_names(3):
            path = f"/srv/logs/{process}.log"
            readers = [i for i in files if any(fnmatch.fnmatchcase(path, g) for g in i["paths"])]
            assert [_service_of(i) for i in readers] == [spec.name], path
    # The data tier's logs (not ECS) are not read.
    for other in ("postgres-primary.log", "redis.log", "mongo.log"):
        assert not any(fnmatch.fnmatchcase(f"/srv/logs/{other}", g) for i in files for g in i["paths"])


@pytest.mark.parametrize("namespace", ["default", "prod"])
def test_filebeat_writes_one_data_stream_per_family_matching_the_template(namespace: str) -> None:
    out = filebeat({"BARBER_LOG_NAMESPACE": namespace})["output.elasticsearch"]
    routes = {dotted(rule, "when.equals")["service.name"]: rule["index"] for rule in out["indices"]}
    assert routes == {f: t.data_stream(f, namespace) for f in t.LOG_FAMILIES}
    for index in [*routes.values(), out["index"]]:
        assert fnmatch.fnmatchcase(index, t.LOG_INDEX_PATTERN), index
        assert fnmatch.fnmatchcase(index, "logs-barber.*")  # the Kibana data view
    assert out["hosts"] == ["http://elasticsearch:9200"]


def test_filebeat_document_ids_are_deterministic_and_setup_is_ours() -> None:
    cfg = filebeat()
    fingerprints = [p["fingerprint"] for p in cfg["processors"] if "fingerprint" in p]
    assert {f["target_field"] for f in fingerprints} == {"@metadata._id"}
    assert [f["fields"] for f in fingerprints] == [["event.id"], ["log.file.path", "log.offset"]]
    assert dotted(fingerprints[0], "when.has_fields") == ["event.id"]
    assert dotted(fingerprints[1], "when.not.has_fields") == ["event.id"]
    # Every field the ids are made of is mapped (so they are there to see in Kibana too).
    assert {"event.id", "log.file.path", "log.offset"} <= set(t.log_fields())
    assert cfg["setup.template.enabled"] is False and cfg["setup.ilm.enabled"] is False


# -- Kibana saved objects -----------------------------------------------------------------
def saved_objects() -> list[dict[str, Any]]:
    lines = (ELK / "kibana" / "barber.ndjson").read_text().splitlines()
    return [json.loads(line) for line in lines if line.strip()]


VIEW_FIELDS = {kibana_objects.LOGS_VIEW: t.log_fields(), kibana_objects.ANALYTICS_VIEW: t.ANALYTICS_FIELDS}
KQL_FIELD = re.compile(r"([A-Za-z_@][\w.@]*)\s*:")


def test_committed_saved_objects_are_what_the_generator_writes() -> None:
    assert (ELK / "kibana" / "barber.ndjson").read_text() == kibana_objects.render(), (
        "run: python -m elk.kibana_objects"
    )


def test_saved_object_references_resolve() -> None:
    objects = saved_objects()
    ids = {(o["type"], o["id"]) for o in objects}
    assert len(ids) == len(objects)
    for o in objects:
        for ref in o["references"]:
            assert (ref["type"], ref["id"]) in ids, (o["id"], ref)
        if o["type"] == "dashboard":
            panels = json.loads(o["attributes"]["panelsJSON"])
            names = {r["name"] for r in o["references"]}
            assert panels and {p["panelRefName"] for p in panels} == names
        if o["type"] == "visualization":
            source = json.loads(o["attributes"]["kibanaSavedObjectMeta"]["searchSourceJSON"])
            assert source["indexRefName"] in {r["name"] for r in o["references"]}
    dashboards = {o["attributes"]["title"] for o in objects if o["type"] == "dashboard"}
    assert dashboards == {"Barber: traffic", "Barber: deletions", "Barber: ETL", "Barber: barber analytics"}


def test_data_views_match_what_the_templates_create() -> None:
    views = {o["id"]: o["attributes"] for o in saved_objects() if o["type"] == "index-pattern"}
    logs = views[kibana_objects.LOGS_VIEW]["title"]
    assert all(fnmatch.fnmatchcase(t.data_stream(f), logs) for f in t.LOG_FAMILIES)
    assert not fnmatch.fnmatchcase(t.ANALYTICS_INDEX, logs)
    assert fnmatch.fnmatchcase(t.ANALYTICS_INDEX, views[kibana_objects.ANALYTICS_VIEW]["title"])
    assert {v["timeFieldName"] for v in views.values()} == {"@timestamp"}


def test_every_field_a_visualization_uses_is_mapped_with_a_fitting_type() -> None:
    used = 0
    for o in saved_objects():
        if o["type"] != "visualization":
            continue
        (view,) = [r["id"] for r in o["references"] if r["type"] == "index-pattern"]
        fields = VIEW_FIELDS[view]
        state = json.loads(o["attributes"]["visState"])
        for agg in state["aggs"]:
            name = agg["params"].get("field")
            if name is None:
                assert agg["type"] == "count"
                continue
            used += 1
            assert name in fields, (o["id"], name)
            kind = fields[name]
            if agg["type"] in ("sum", "avg", "max", "min", "percentiles"):
                assert kind in NUMERIC, (o["id"], name, kind)
            elif agg["type"] == "date_histogram":
                assert kind == "date", (o["id"], name)
            else:
                assert kind in AGGREGATABLE, (o["id"], name, kind)
            if agg["type"] == "terms":
                assert agg["params"]["orderBy"] in {a["id"] for a in state["aggs"] if a["schema"] == "metric"}
        query = json.loads(o["attributes"]["kibanaSavedObjectMeta"]["searchSourceJSON"])["query"]["query"]
        for name in KQL_FIELD.findall(query):
            used += 1
            assert name in fields, (o["id"], name)
    assert used > 30
