"""Everything `python -m elk setup` installs in Elasticsearch, as plain data.

Field lists are flat (``"http.response.status_code": "long"``) so that the tests can check
real log lines against them and the Kibana generator can check the fields it uses; they
are turned into nested ``properties`` here. ECS fields keep their ECS names and types; our
own fields live under ``barber.*``.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
from collections.abc import Iterator
from typing import Any

# -- names --------------------------------------------------------------------------
# Data streams are logs-barber.<family>-<namespace>; one per service family.
LOG_FAMILIES: tuple[str, ...] = ("gateway", "authen", "chat", "discovery", "etl")
LOG_DATASET_PREFIX = "barber."
LOG_INDEX_PATTERN = "logs-barber.*-*"
LOGS_TEMPLATE = "barber-logs"
LOGS_ECS_COMPONENT = "barber-logs@ecs"
LOGS_BARBER_COMPONENT = "barber-logs@barber"
LOGS_SETTINGS_COMPONENT = "barber-logs@settings"
LOGS_PIPELINE = "barber-logs"
LOGS_ILM_POLICY = "barber-logs"

ANALYTICS_INDEX = "barber-analytics-daily"
ANALYTICS_INDEX_PATTERN = "barber-analytics-*"
ANALYTICS_TEMPLATE = "barber-analytics"
ANALYTICS_COMPONENT = "barber-analytics@mappings"

# Above the built-in `logs` template (priority 100, pattern logs-*-*), which would
# otherwise win for our data streams.
TEMPLATE_PRIORITY = 200


def data_stream(family: str, namespace: str = "default") -> str:
    return f"logs-{LOG_DATASET_PREFIX}{family}-{namespace}"


# -- fields -------------------------------------------------------------------------
# ECS core fields the services emit (common/logs.py, common/handler.py, the services'
# `extra=`), plus what Filebeat adds when it ships them.
ECS_FIELDS: dict[str, str] = {
    "@timestamp": "date",
    "message": "match_only_text",
    "ecs.version": "keyword",
    "log.level": "keyword",
    "log.logger": "keyword",
    "log.origin.file.name": "keyword",
    "log.origin.file.line": "long",
    "log.origin.function": "keyword",
    "service.name": "keyword",
    "service.node.name": "keyword",
    "event.id": "keyword",
    "event.kind": "keyword",
    "event.category": "keyword",
    "event.type": "keyword",
    "event.action": "keyword",
    "event.outcome": "keyword",
    "event.dataset": "keyword",
    "event.duration": "long",
    "event.ingested": "date",
    "http.request.id": "keyword",
    "http.request.method": "keyword",
    "http.response.status_code": "long",
    "url.path": "keyword",
    "client.ip": "ip",
    "user.id": "keyword",
    "error.message": "match_only_text",
    "error.type": "keyword",
    "error.stack_trace": "wildcard",
    # Added by Filebeat (filestream/container inputs, add_docker_metadata, add_host_metadata).
    "agent.type": "keyword",
    "agent.name": "keyword",
    "agent.version": "keyword",
    "agent.id": "keyword",
    "agent.ephemeral_id": "keyword",
    "host.name": "keyword",
    "host.hostname": "keyword",
    "input.type": "keyword",
    "log.file.path": "keyword",
    "log.offset": "long",
    "stream": "keyword",
    "container.id": "keyword",
    "container.name": "keyword",
    "container.image.name": "keyword",
    "tags": "keyword",
    "data_stream.type": "constant_keyword",
    "data_stream.dataset": "constant_keyword",
    "data_stream.namespace": "constant_keyword",
}

# Our own fields. Every custom `extra=` key a service logs must be one of these.
BARBER_FIELDS: dict[str, str] = {
    # gateway: a proxied request (on its access line) and the upstream that served it
    "barber.route": "keyword",  # "/authen/authen", "other" for unknown paths
    "barber.upstream.service": "keyword",  # authen, chat, etl
    "barber.upstream.instance": "keyword",  # host:port, "none" when no instance answered
    "barber.retry.reason": "keyword",  # connect, timeout, status, error
    # circuit breaker transitions
    "barber.breaker.state": "keyword",
    "barber.breaker.previous_state": "keyword",
    # load alerts
    "barber.load.threshold_per_s": "long",
    "barber.load.per_s": "long",
    "barber.load.shared": "boolean",  # counted over every gateway (Redis) or this one
    # deletion transactions (coordinator)
    "barber.transaction.id": "keyword",
    "barber.transaction.mode": "keyword",  # 2pc, saga
    "barber.transaction.state": "keyword",  # started, committed, aborted, compensated, ...
    "barber.transaction.decision": "keyword",
    "barber.transaction.participant": "keyword",
    # chat
    "barber.chat.id": "keyword",
    # ETL runs
    "barber.etl.run_id": "long",
    "barber.etl.mode": "keyword",  # incremental, full
    "barber.etl.state": "keyword",  # running, succeeded, failed
    "barber.etl.rows.extracted": "long",
    "barber.etl.rows.transformed": "long",
    "barber.etl.rows.loaded": "long",
    "barber.etl.rows.skipped": "long",
    "barber.etl.indexed": "long",
    "barber.etl.skipped_id": "keyword",  # a source row left out of a run
}

# One document per barber and day, id "<barber_id>:<day>" (elk/analytics.py).
ANALYTICS_METRICS: tuple[str, ...] = (
    "chats_started",
    "new_customers",
    "returning_customers",
    "customer_messages",
    "barber_messages",
    "replies",
    "unanswered_chats",
)
ANALYTICS_FIELDS: dict[str, str] = {
    "@timestamp": "date",
    "day": "date",
    "barber.id": "long",
    "barber.username": "keyword",
    "barber.first_name": "keyword",
    "barber.last_name": "keyword",
    **dict.fromkeys(ANALYTICS_METRICS, "long"),
    "reply_time_median_s": "double",
    "reply_time_p90_s": "double",
    "etl.run_id": "long",
}

_FIELD_OPTIONS: dict[str, dict[str, Any]] = {
    "keyword": {"ignore_above": 1024},
    "date": {"format": "strict_date_optional_time||epoch_millis"},
}


def properties(fields: dict[str, str]) -> dict[str, Any]:
    """Flat ``{"a.b": type}`` -> nested mapping ``properties``."""
    root: dict[str, Any] = {}
    for path, type_ in sorted(fields.items()):
        node = root
        *parents, leaf = path.split(".") if not path.startswith("@") else [path]
        for part in parents:
            node = node.setdefault(part, {"properties": {}})["properties"]
        node[leaf] = {"type": type_, **_FIELD_OPTIONS.get(type_, {})}
    return root


def flatten_properties(props: dict[str, Any], prefix: str = "") -> dict[str, str]:
    """Nested mapping ``properties`` -> flat ``{"a.b": type}`` (the inverse of :func:`properties`)."""
    out: dict[str, str] = {}
    for name, spec in props.items():
        path = f"{prefix}{name}"
        if "properties" in spec:
            out.update(flatten_properties(spec["properties"], path + "."))
        else:
            out[path] = spec["type"]
    return out


# `labels` is ECS's open-ended keyword map: any key, always a keyword.
_LABELS_DYNAMIC = {
    "labels_as_keyword": {"path_match": "labels.*", "mapping": {"type": "keyword", "ignore_above": 1024}}
}


def ilm_policy(retention_days: int, rollover_max_size: str = "10gb", rollover_max_age: str = "1d") -> dict[str, Any]:
    return {
        "phases": {
            "hot": {
                "min_age": "0ms",
                "actions": {
                    "rollover": {"max_primary_shard_size": rollover_max_size, "max_age": rollover_max_age},
                },
            },
            "delete": {"min_age": f"{retention_days}d", "actions": {"delete": {}}},
        },
        "_meta": {"description": "Barber service logs: roll over by size or age, delete after the retention"},
    }


def logs_pipeline() -> dict[str, Any]:
    # The services already write ECS JSON, which Filebeat decodes; this only normalises
    # what other writers may differ in and stamps the ingest time.
    return {
        "description": "Barber service logs (ECS JSON decoded by Filebeat)",
        "processors": [
            {"set": {"field": "event.ingested", "value": "{{{_ingest.timestamp}}}"}},
            {"lowercase": {"field": "log.level", "ignore_missing": True}},
            {"set": {"field": "event.kind", "value": "event", "override": False}},
            # A line that was not JSON (a crash's traceback on stderr) keeps its text and is
            # marked, rather than lost.
            {
                "set": {
                    "if": "ctx.error?.message != null && ctx['@timestamp'] == null",
                    "field": "@timestamp",
                    "value": "{{{_ingest.timestamp}}}",
                }
            },
        ],
        "on_failure": [
            {"set": {"field": "event.kind", "value": "pipeline_error"}},
            {"append": {"field": "error.message", "value": "{{{ _ingest.on_failure_message }}}"}},
        ],
    }


def component_templates(replicas: int) -> dict[str, dict[str, Any]]:
    return {
        LOGS_SETTINGS_COMPONENT: {
            "template": {
                "settings": {
                    "index": {
                        "lifecycle": {"name": LOGS_ILM_POLICY},
                        "default_pipeline": LOGS_PIPELINE,
                        "number_of_replicas": replicas,
                        "codec": "best_compression",
                    },
                }
            },
            "_meta": {"description": "Barber logs: ILM policy, default pipeline"},
        },
        LOGS_ECS_COMPONENT: {
            "template": {
                "mappings": {
                    "dynamic": False,
                    "date_detection": False,
                    "dynamic_templates": [_LABELS_DYNAMIC],
                    "properties": {**properties(ECS_FIELDS), "labels": {"type": "object", "dynamic": True}},
                }
            },
            "_meta": {"description": "ECS core fields the Barber services emit"},
        },
        LOGS_BARBER_COMPONENT: {
            "template": {
                "mappings": {
                    "properties": properties(BARBER_FIELDS),
                }
            },
            "_meta": {"description": "Barber's own log fields, under barber.*"},
        },
        ANALYTICS_COMPONENT: {
            "template": {
                "settings": {"index": {"number_of_replicas": replicas}},
                "mappings": {"dynamic": "strict", "properties": properties(ANALYTICS_FIELDS)},
            },
            "_meta": {"description": "Per-barber daily analytics written by the ETL"},
        },
    }


def index_templates() -> dict[str, dict[str, Any]]:
    return {
        LOGS_TEMPLATE: {
            "index_patterns": [LOG_INDEX_PATTERN],
            "data_stream": {},
            "priority": TEMPLATE_PRIORITY,
            "composed_of": [LOGS_SETTINGS_COMPONENT, LOGS_ECS_COMPONENT, LOGS_BARBER_COMPONENT],
            "_meta": {"description": "Barber service logs, one data stream per service family"},
        },
        ANALYTICS_TEMPLATE: {
            "index_patterns": [ANALYTICS_INDEX_PATTERN],
            "priority": TEMPLATE_PRIORITY,
            "composed_of": [ANALYTICS_COMPONENT],
            "_meta": {"description": "Barber analytics: one document per barber and day"},
        },
    }


def log_fields() -> dict[str, str]:
    """Every field the logs template maps, flat."""
    return {**ECS_FIELDS, **BARBER_FIELDS}


# -- checking a document against a mapping --------------------------------------------
def _fits(type_: str, value: Any) -> bool:
    if type_ in ("keyword", "constant_keyword"):
        # Elasticsearch indexes numbers and booleans in a keyword field as their text.
        return isinstance(value, (str, int, bool)) and not isinstance(value, float)
    if type_ in ("match_only_text", "text", "wildcard"):
        return isinstance(value, str)
    if type_ == "boolean":
        return isinstance(value, bool)
    if type_ == "long":
        return isinstance(value, int) and not isinstance(value, bool)
    if type_ == "double":
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if type_ == "date":
        try:
            dt.datetime.fromisoformat(str(value).replace("Z", "+00:00"))
        except ValueError:
            return False
        return isinstance(value, str)
    if type_ == "ip":
        try:
            ipaddress.ip_address(value)
        except ValueError:
            return False
        return True
    raise ValueError(f"no check for mapping type {type_}")


def _leaves(doc: dict[str, Any], prefix: str = "") -> Iterator[tuple[str, Any]]:
    for key, value in doc.items():
        if isinstance(value, dict):
            yield from _leaves(value, f"{prefix}{key}.")
        else:
            yield prefix + key, value


def get_field(doc: dict[str, Any], path: str) -> Any:
    """A field's value whether the document spells it dotted ("log.level") or nested."""
    if path in doc:
        return doc[path]
    head, _, rest = path.partition(".")
    node = doc.get(head)
    return get_field(node, rest) if rest and isinstance(node, dict) else (node if not rest else None)


def mapping_problems(doc: dict[str, Any], fields: dict[str, str] | None = None) -> list[str]:
    """What Elasticsearch would not index as intended: fields the template does not map
    (with ``dynamic: false`` they would be kept but not searchable) and values of the
    wrong type. Dotted keys ("log.level") and nested objects are the same field."""
    fields = log_fields() if fields is None else fields
    problems = []
    for path, value in _leaves(doc):
        type_ = "keyword" if path.startswith("labels.") else fields.get(path)
        if type_ is None:
            problems.append(f"{path}: not mapped")
            continue
        for item in value if isinstance(value, list) else [value]:
            if item is not None and not _fits(type_, item):
                problems.append(f"{path}: {item!r} is not a {type_}")
    return problems
