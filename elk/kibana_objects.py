"""The Kibana saved objects (data views, visualizations, dashboards), generated.

`python -m elk.kibana_objects` writes ``elk/kibana/barber.ndjson``, the committed file that
`python -m elk setup` imports (and that can be imported by hand in Kibana's Saved Objects
page). Generating it keeps every reference and every field consistent with
``elk/templates.py``; the tests check the committed file is what this produces.

Visualizations are the aggregation-based kind (``visualization`` saved objects): their
shape is small and stable, and Kibana migrates them on import.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from elk import templates as t

OUT = Path(__file__).resolve().parent / "kibana" / "barber.ndjson"

LOGS_VIEW = "barber-logs"
ANALYTICS_VIEW = "barber-analytics"
INDEX_REF = "kibanaSavedObjectMeta.searchSourceJSON.index"

# Lines that are the gateway's proxied requests (its access line names the upstream).
GATEWAY_REQUESTS = "service.name:gateway and barber.upstream.service:*"


def _dumps(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"), sort_keys=True)


def data_view(id_: str, title: str, name: str) -> dict[str, Any]:
    return {
        "type": "index-pattern",
        "id": id_,
        "attributes": {"title": title, "name": name, "timeFieldName": "@timestamp"},
        "references": [],
    }


# -- aggregations ---------------------------------------------------------------------
def count(id_: str = "1") -> dict[str, Any]:
    return {"id": id_, "enabled": True, "type": "count", "params": {}, "schema": "metric"}


def metric(id_: str, type_: str, field: str, **params: Any) -> dict[str, Any]:
    return {"id": id_, "enabled": True, "type": type_, "params": {"field": field, **params}, "schema": "metric"}


def over_time(id_: str, field: str = "@timestamp", interval: str = "auto") -> dict[str, Any]:
    return {
        "id": id_,
        "enabled": True,
        "type": "date_histogram",
        "schema": "segment",
        "params": {
            "field": field,
            "useNormalizedEsInterval": True,
            "scaleMetricValues": False,
            "interval": interval,
            "drop_partials": False,
            "min_doc_count": 1,
            "extended_bounds": {},
        },
    }


def terms(id_: str, field: str, schema: str, order_by: str = "1", size: int = 10) -> dict[str, Any]:
    return {
        "id": id_,
        "enabled": True,
        "type": "terms",
        "schema": schema,
        "params": {
            "field": field,
            "orderBy": order_by,
            "order": "desc",
            "size": size,
            "otherBucket": False,
            "otherBucketLabel": "Other",
            "missingBucket": False,
            "missingBucketLabel": "Missing",
        },
    }


# -- visualizations -------------------------------------------------------------------
def _xy_params(kind: str, metric_ids: list[str], mode: str) -> dict[str, Any]:
    return {
        "type": kind,
        "grid": {"categoryLines": False},
        "categoryAxes": [
            {
                "id": "CategoryAxis-1",
                "type": "category",
                "position": "bottom",
                "show": True,
                "scale": {"type": "linear"},
                "labels": {"show": True, "filter": True, "truncate": 100},
                "title": {},
            }
        ],
        "valueAxes": [
            {
                "id": "ValueAxis-1",
                "name": "LeftAxis-1",
                "type": "value",
                "position": "left",
                "show": True,
                "scale": {"type": "linear", "mode": "normal"},
                "labels": {"show": True, "rotate": 0, "filter": False, "truncate": 100},
                "title": {},
            }
        ],
        "seriesParams": [
            {
                "show": True,
                "type": kind,
                "mode": mode,
                "data": {"id": m, "label": ""},
                "valueAxis": "ValueAxis-1",
                "drawLinesBetweenPoints": True,
                "lineWidth": 2,
                "showCircles": True,
                "interpolate": "linear",
            }
            for m in metric_ids
        ],
        "addTooltip": True,
        "addLegend": True,
        "legendPosition": "right",
        "times": [],
        "addTimeMarker": False,
        "labels": {"show": False},
        "thresholdLine": {"show": False, "value": 10, "width": 1, "style": "full", "color": "#E7664C"},
    }


TABLE_PARAMS = {
    "perPage": 10,
    "showPartialRows": False,
    "showMetricsAtAllLevels": False,
    "showTotal": True,
    "totalFunc": "sum",
    "percentageCol": "",
}


def vis(
    id_: str, title: str, view: str, vis_type: str, aggs: list[dict[str, Any]], query: str = "", mode: str = "stacked"
) -> dict[str, Any]:
    metric_ids = [a["id"] for a in aggs if a["schema"] == "metric"]
    params = TABLE_PARAMS if vis_type == "table" else _xy_params(vis_type, metric_ids, mode)
    return {
        "type": "visualization",
        "id": id_,
        "attributes": {
            "title": title,
            "description": "",
            "version": 1,
            "uiStateJSON": "{}",
            "visState": _dumps({"title": title, "type": vis_type, "aggs": aggs, "params": params}),
            "kibanaSavedObjectMeta": {
                "searchSourceJSON": _dumps(
                    {"query": {"query": query, "language": "kuery"}, "filter": [], "indexRefName": INDEX_REF}
                )
            },
        },
        "references": [{"name": INDEX_REF, "type": "index-pattern", "id": view}],
    }


def dashboard(id_: str, title: str, description: str, panels: list[dict[str, Any]]) -> dict[str, Any]:
    grid = []
    for n, _panel in enumerate(panels):
        grid.append(
            {
                "type": "visualization",
                "panelIndex": str(n + 1),
                "panelRefName": f"panel_{n}",
                "embeddableConfig": {},
                "gridData": {"x": 24 * (n % 2), "y": 15 * (n // 2), "w": 24, "h": 15, "i": str(n + 1)},
            }
        )
    return {
        "type": "dashboard",
        "id": id_,
        "attributes": {
            "title": title,
            "description": description,
            "version": 1,
            "timeRestore": True,
            "timeFrom": "now-24h",
            "timeTo": "now",
            "optionsJSON": _dumps({"useMargins": True, "syncColors": False, "hidePanelTitles": False}),
            "panelsJSON": _dumps(grid),
            "kibanaSavedObjectMeta": {
                "searchSourceJSON": _dumps({"query": {"query": "", "language": "kuery"}, "filter": []})
            },
        },
        "references": [{"name": f"panel_{n}", "type": "visualization", "id": p["id"]} for n, p in enumerate(panels)],
    }


def traffic() -> list[dict[str, Any]]:
    L = LOGS_VIEW
    return [
        vis(
            "barber-traffic-by-service",
            "Requests by upstream service",
            L,
            "histogram",
            [count(), over_time("2"), terms("3", "barber.upstream.service", "group")],
            GATEWAY_REQUESTS,
        ),
        vis(
            "barber-traffic-by-route-status",
            "Requests by route and status",
            L,
            "table",
            [count(), terms("2", "barber.route", "bucket", size=20), terms("3", "http.response.status_code", "bucket")],
            GATEWAY_REQUESTS,
        ),
        vis(
            "barber-traffic-latency",
            "Gateway latency percentiles (event.duration, ns)",
            L,
            "line",
            [metric("1", "percentiles", "event.duration", percents=[50, 95, 99]), over_time("2")],
            GATEWAY_REQUESTS,
            mode="normal",
        ),
        vis(
            "barber-traffic-gateway-errors",
            "Gateway 429 / 503 / 504",
            L,
            "histogram",
            [count(), over_time("2"), terms("3", "http.response.status_code", "group")],
            "service.name:gateway and http.response.status_code:(429 or 503 or 504)",
        ),
        vis(
            "barber-traffic-service-status",
            "Requests handled by each service, by status",
            L,
            "histogram",
            [count(), over_time("2"), terms("3", "service.name", "group")],
            "http.response.status_code:*",
        ),
        vis(
            "barber-traffic-breakers",
            "Circuit breaker transitions",
            L,
            "histogram",
            [count(), over_time("2"), terms("3", "barber.breaker.state", "group")],
            "event.action:(breaker-open or breaker-half-open or breaker-closed)",
        ),
        vis(
            "barber-traffic-load-alerts",
            "Load alerts by instance",
            L,
            "table",
            [
                count(),
                terms("2", "barber.upstream.service", "bucket"),
                terms("3", "barber.upstream.instance", "bucket", size=20),
            ],
            "event.kind:alert and event.action:load-alert",
        ),
    ]


def deletions() -> list[dict[str, Any]]:
    L = LOGS_VIEW
    return [
        vis(
            "barber-deletions-by-state",
            "Deletion transactions by state",
            L,
            "histogram",
            [count(), over_time("2"), terms("3", "barber.transaction.state", "group")],
            "barber.transaction.state:*",
        ),
        vis(
            "barber-deletions-mode-state",
            "Transactions by mode and state",
            L,
            "table",
            [
                metric("1", "cardinality", "barber.transaction.id"),
                terms("2", "barber.transaction.mode", "bucket"),
                terms("3", "barber.transaction.state", "bucket"),
            ],
            "barber.transaction.id:*",
        ),
        vis(
            "barber-deletions-recoveries",
            "Recoveries (resumed, presumed abort, orphans resolved)",
            L,
            "histogram",
            [count(), over_time("2"), terms("3", "event.action", "group")],
            "event.action:(recovery-resume or presumed-abort or recovery-resolve)",
        ),
    ]


def etl() -> list[dict[str, Any]]:
    L = LOGS_VIEW
    runs = "service.name:etl and event.action:etl-run"
    return [
        vis(
            "barber-etl-runs",
            "ETL runs by outcome",
            L,
            "histogram",
            [count(), over_time("2"), terms("3", "barber.etl.state", "group")],
            runs,
        ),
        vis(
            "barber-etl-duration",
            "ETL run duration (event.duration, ns)",
            L,
            "line",
            [metric("1", "max", "event.duration"), metric("4", "avg", "event.duration"), over_time("2")],
            runs,
            mode="normal",
        ),
        vis(
            "barber-etl-rows",
            "ETL rows per run",
            L,
            "line",
            [
                metric("1", "sum", "barber.etl.rows.extracted"),
                metric("3", "sum", "barber.etl.rows.loaded"),
                metric("4", "sum", "barber.etl.rows.skipped"),
                metric("5", "sum", "barber.etl.indexed"),
                over_time("2"),
            ],
            "service.name:etl and event.action:(etl-run or etl-index)",
            mode="normal",
        ),
        vis(
            "barber-etl-failures",
            "Failed ETL runs",
            L,
            "table",
            [count(), terms("2", "barber.etl.run_id", "bucket", size=20), terms("3", "error.type", "bucket")],
            runs + " and barber.etl.state:failed",
        ),
    ]


def analytics() -> list[dict[str, Any]]:
    A = ANALYTICS_VIEW
    return [
        vis(
            "barber-analytics-leaderboard",
            "Barber leaderboard",
            A,
            "table",
            [
                metric("1", "sum", "customer_messages"),
                terms("2", "barber.username", "bucket", size=25),
                metric("3", "sum", "chats_started"),
                metric("4", "sum", "new_customers"),
                metric("5", "sum", "returning_customers"),
                metric("6", "sum", "replies"),
                metric("7", "sum", "unanswered_chats"),
                metric("8", "avg", "reply_time_median_s"),
            ],
        ),
        vis(
            "barber-analytics-reply-times",
            "Reply times (median and p90, seconds)",
            A,
            "line",
            [
                metric("1", "avg", "reply_time_median_s"),
                metric("3", "avg", "reply_time_p90_s"),
                over_time("2", "day", "d"),
            ],
            mode="normal",
        ),
        vis(
            "barber-analytics-reply-by-barber",
            "Median reply time by barber (seconds)",
            A,
            "histogram",
            [metric("1", "avg", "reply_time_median_s"), terms("2", "barber.username", "segment", size=25)],
        ),
        vis(
            "barber-analytics-messages",
            "Messages per day",
            A,
            "histogram",
            [
                metric("1", "sum", "customer_messages"),
                metric("3", "sum", "barber_messages"),
                over_time("2", "day", "d"),
            ],
            mode="normal",
        ),
    ]


def saved_objects() -> list[dict[str, Any]]:
    views = [
        data_view(LOGS_VIEW, "logs-barber.*", "Barber logs"),
        data_view(ANALYTICS_VIEW, t.ANALYTICS_INDEX_PATTERN, "Barber analytics"),
    ]
    boards = [
        (
            "barber-dashboard-traffic",
            "Barber: traffic",
            "Requests through the gateway by service, route and status; latency; 429/503/504; breakers; load alerts",
            traffic(),
        ),
        (
            "barber-dashboard-deletions",
            "Barber: deletions",
            "Account deletions: 2PC and saga transactions by state, and recoveries",
            deletions(),
        ),
        ("barber-dashboard-etl", "Barber: ETL", "ETL runs, durations, rows and failures", etl()),
        (
            "barber-dashboard-analytics",
            "Barber: barber analytics",
            "Per-barber daily analytics from the ETL: leaderboard and reply times",
            analytics(),
        ),
    ]
    objects: list[dict[str, Any]] = list(views)
    for id_, title, description, panels in boards:
        objects += panels
        objects.append(dashboard(id_, title, description, panels))
    return objects


def render() -> str:
    return "".join(_dumps(o) + "\n" for o in saved_objects())


def main() -> None:
    OUT.write_text(render())
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
