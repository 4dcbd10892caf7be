"""chat's query and response models: the handlers validate with them and the OpenAPI
document is generated from them (common.openapi)."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, Field

from chat.chats import HISTORY_MAX, LIST_DEFAULT, LIST_MAX
from common.openapi import QueryInt, QueryModel, bounded_int, optional_param

MAX_ID = 2**63 - 1
# Any non-empty string: one that cannot be a chat id (e.g. over CHAT_ID_MAX_LEN) is no
# chat (404), decided before the database is asked.
ChatId = Annotated[str, Field(min_length=1, description="a chat's id")]


class StartQuery(QueryModel):
    employee_id: QueryInt = Field(ge=1, le=MAX_ID)


class ListQuery(QueryModel):
    limit: QueryInt = Field(LIST_DEFAULT, ge=1, le=LIST_MAX)
    offset: QueryInt = Field(0, ge=0, le=1_000_000)


class ChatQuery(QueryModel):
    id: ChatId


class HistoryQuery(QueryModel):
    id: ChatId
    before: bounded_int(1, MAX_ID) | None = optional_param("only messages with a lower seq")  # type: ignore[valid-type]  # a runtime-built Annotated type
    limit: QueryInt = Field(50, ge=1, le=HISTORY_MAX)


class ChatRef(BaseModel):
    chat_id: str
    ws_url: str


class Person(BaseModel):
    id: int
    first_name: str | None
    last_name: str | None


class Message(BaseModel):
    type: Literal["chat_message"]
    chat_id: str
    seq: int
    message: str
    sender: Person
    sent_at: str
    client_id: str | None = optional_param("the sender's id for the message, if it gave one")


class ChatSummary(BaseModel):
    chat_id: str
    ws_url: str
    other: Person
    last_message: Message | None
    created_at: str
    last_activity_at: str
    deleting: bool


class HistoryPage(BaseModel):
    chat_id: str
    messages: list[Message]
    next_before: int | None


class PurgeQuery(QueryModel):
    limit: QueryInt = Field(2000, ge=1, le=100_000)
