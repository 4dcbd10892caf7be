"""Prometheus metrics of the etl process."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

REGISTRY = CollectorRegistry()
RUNS = Counter("etl_runs", "ETL runs finished, by outcome", ["state"], registry=REGISTRY)
ROWS = Counter("etl_rows", "Rows handled by ETL runs, by phase", ["phase"], registry=REGISTRY)
RUN_SECONDS = Histogram(
    "etl_run_seconds", "Duration of ETL runs", registry=REGISTRY, buckets=(0.1, 0.5, 1, 2, 5, 10, 30, 60, 120, 300, 900)
)
LAST_SUCCESS = Gauge("etl_last_success_timestamp_seconds", "When the last successful run finished", registry=REGISTRY)
