"""The analytics API's query and response models: the handlers validate with them and
the OpenAPI document is generated from them (common.openapi)."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, Field

from common.openapi import OpenModel, QueryInt, QueryModel, optional_param
from etl.analytics import SORT_KEYS

MAX_OFFSET = 1_000_000
# The shape of a day; whether it is a real one (and the range's rules) is analytics.parse_period's.
Day = Annotated[str, Field(pattern=r"^[0-9]{4}-[0-9]{2}-[0-9]{2}$", json_schema_extra={"format": "date"})]


class StartRunQuery(QueryModel):
    full_refresh: Literal["0", "1", "true", "false", "yes", "no"] = Field(
        "0", description="1: rebuild the warehouse from scratch instead of an incremental run"
    )


class RunsQuery(QueryModel):
    limit: QueryInt = Field(20, ge=1, le=500)
    offset: QueryInt = Field(0, ge=0, le=MAX_OFFSET)


class PeriodQuery(QueryModel):
    from_: Day | None = optional_param("first day (default: 29 days before `to`)", alias="from")
    to: Day | None = optional_param("last day (default: today, UTC)")


class LeaderboardQuery(PeriodQuery):
    sort: Literal[SORT_KEYS] | None = optional_param("default: customer_messages")  # type: ignore[valid-type]
    order: Literal["asc", "desc"] | None = optional_param("default: desc")
    limit: QueryInt = Field(50, ge=1, le=1000)
    offset: QueryInt = Field(0, ge=0, le=MAX_OFFSET)


class RunStarted(BaseModel):
    run_id: int


class Run(OpenModel):
    run_id: int
    mode: Literal["incremental", "full"]
    state: Literal["running", "succeeded", "failed"]
    started_at: str
    finished_at: str | None
    rows: dict[str, Any]
    watermarks: dict[str, Any]
    error: str | None
    elasticsearch: dict[str, Any] | None


class RunList(BaseModel):
    runs: list[Run]


class Barber(BaseModel):
    barber_id: int
    username: str
    first_name: str
    last_name: str


class Metrics(BaseModel):
    chats_started: int
    new_customers: int
    returning_customers: int
    customer_messages: int
    barber_messages: int
    replies: int
    reply_time_median_s: float | None
    reply_time_p90_s: float | None
    unanswered_chats: int


class BarberRow(Barber, Metrics):
    pass


class DayRow(Metrics):
    day: str


class Leaderboard(BaseModel):
    from_: str = Field(alias="from")
    to: str
    sort: str
    order: Literal["asc", "desc"]
    limit: int
    offset: int
    total: int
    barbers: list[BarberRow]


class Daily(BaseModel):
    barber: Barber
    from_: str = Field(alias="from")
    to: str
    days: list[DayRow]
