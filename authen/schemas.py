"""authen's query and response models: the handlers validate with them and the OpenAPI
document is generated from them (common.openapi)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field

from authen.users import MAX_USER_ID
from common.openapi import QueryFloat, QueryInt, QueryModel

SLEEPY_MAX_S = 60.0


class EmployeeQuery(QueryModel):
    limit: QueryInt = Field(100, ge=1, le=1000, description="page size")
    offset: QueryInt = Field(0, ge=0, le=2**31 - 1, description="employees to skip")


class CheckQuery(QueryModel):
    user_id: QueryInt = Field(ge=1, le=MAX_USER_ID)


class SleepyQuery(QueryModel):
    seconds: QueryFloat = Field(5.0, ge=0.0, le=SLEEPY_MAX_S)


class SignupResult(BaseModel):
    detail: str
    user_id: int


class Employee(BaseModel):
    id: int
    username: str
    first_name: str
    last_name: str


class UserProfile(Employee):
    type: Literal["customer", "employee", "admin"]


class SleepyResult(BaseModel):
    detail: str
    seconds: float
    instance: str
