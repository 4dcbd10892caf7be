"""The etl service's configuration (environment variables; defaults join the local stack)."""

from __future__ import annotations

from pydantic import Field, model_validator

from common.config import ServiceSettings

_LOCAL_PG = "postgresql+psycopg://barber@127.0.0.1:{port}/{db}"

CRASH_POINTS = ("mid_load", "before_commit")


class EtlSettings(ServiceSettings):
    port: int = 8300
    # The warehouse: written on the primary, the analytics API reads from the replicas.
    warehouse_database_url: str = _LOCAL_PG.format(port=15432, db="warehouse")
    warehouse_replica_urls: str = ",".join(_LOCAL_PG.format(port=p, db="warehouse") for p in (15433, 15434))
    # authen's users: read from the replicas, the primary when none answers.
    authen_replica_urls: str = ",".join(_LOCAL_PG.format(port=p, db="authen") for p in (15433, 15434))
    authen_database_url: str = _LOCAL_PG.format(port=15432, db="authen")
    mongo_url: str = "mongodb://127.0.0.1:27018/"
    chat_mongo_db: str = "chat"
    # The schedule: one run every interval; a failed run is retried sooner, with backoff.
    etl_interval_s: float = Field(300.0, gt=0)
    etl_retry_min_s: float = Field(5.0, gt=0)
    # Messages are re-read this far behind the watermark: chat instances write in
    # batches, so a message can be stored with a timestamp below a finished run's mark.
    etl_late_window_s: float = Field(120.0, ge=0)
    # Messages per extract/transform/load chunk (bounds the memory of a run).
    etl_chunk_rows: int = Field(20_000, ge=100, le=1_000_000)
    etl_db_connect_timeout_s: float = Field(3.0, gt=0)
    # Empty: indexing for Kibana is off.
    elasticsearch_url: str = ""
    elasticsearch_index: str = "barber-analytics-daily"
    # Test-only: the run kills its own process at this point (needs BARBER_TEST_HOOKS=1).
    etl_crash_at: str = ""
    # Test-only: after taking the run lock, the run waits while this file exists.
    etl_pause_file: str = ""

    @model_validator(mode="after")
    def _hooks_need_test_mode(self) -> EtlSettings:
        if self.etl_crash_at and self.etl_crash_at not in CRASH_POINTS:
            raise ValueError(f"ETL_CRASH_AT must be one of {', '.join(CRASH_POINTS)}")
        if (self.etl_crash_at or self.etl_pause_file) and not self.barber_test_hooks:
            raise ValueError("ETL_CRASH_AT and ETL_PAUSE_FILE are test hooks and need BARBER_TEST_HOOKS=1")
        return self
