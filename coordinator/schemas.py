"""The admin API's query and response models: the handlers validate with them and the
OpenAPI document is generated from them (common.openapi)."""

from __future__ import annotations

import uuid
from typing import Any, Literal

from pydantic import BaseModel, Field

from common.openapi import QueryInt, QueryModel, bounded_int, optional_param

MAX_ID = 2**63 - 1


class DeleteQuery(QueryModel):
    mode: Literal["2pc", "saga"] = Field("2pc", description="2pc: answer when done; saga: 202 at once")


class TransactionsQuery(QueryModel):
    state: Literal["running", "committed", "aborted"] | None = optional_param()
    user_id: bounded_int(1, MAX_ID) | None = optional_param()  # type: ignore[valid-type]  # a runtime-built Annotated type
    limit: QueryInt = Field(50, ge=1, le=500)


class TransactionPath(BaseModel):
    transaction_id: uuid.UUID


class DeletionStarted(BaseModel):
    transaction_id: str
    state: str
    detail: str | None = optional_param("why, when the deletion was aborted")


class Transaction(BaseModel):
    transaction_id: str
    kind: str
    mode: Literal["2pc", "saga"]
    user_id: int
    state: str
    completed: bool
    detail: str | None
    created_at: str
    updated_at: str
    finished_at: str | None
    decision: str | None = Field(None, description="2pc only")
    participants: Any = Field(None, description="2pc only")
    steps: Any = Field(None, description="saga only")


class TransactionList(BaseModel):
    transactions: list[Transaction]
