"""authen's HTTP handlers: parse, call a domain function from ``authen.users``, write JSON.
Routes are at the bottom."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

from authen import users
from authen.settings import AuthenSettings
from common.errors import NotFound
from common.handler import BaseHandler

DEPS = "authen.deps"
STATE = "authen.state"

SLEEPY_MAX_S = 60.0


def sleepy_seconds(requested: float) -> float:
    """Sleepy never holds a request longer than a minute, whatever is asked."""
    return min(requested, SLEEPY_MAX_S)


@dataclass
class State:
    settings: AuthenSettings
    instance: str
    sleepy_received: int = 0
    sleepy_active: int = 0


class AuthenHandler(BaseHandler):
    @property
    def deps(self) -> users.Deps:
        return self.settings[DEPS]

    @property
    def state(self) -> State:
        return self.settings[STATE]


class SignupHandler(AuthenHandler):
    async def post(self) -> None:
        req = self.parse_body(users.SignupRequest)
        user_id = await users.signup(self.deps, req)
        self.write_json({"detail": "user created", "user_id": user_id}, status=201)


class SigninHandler(AuthenHandler):
    async def post(self) -> None:
        req = self.parse_body(users.SigninRequest)
        self.write_json(await users.signin(self.deps, req))


class EmployeeListHandler(AuthenHandler):
    async def get(self) -> None:
        limit = self.query_int("limit", 100, minimum=1, maximum=1000)
        offset = self.query_int("offset", 0, minimum=0, maximum=2**31 - 1)
        self.write_json(await users.list_employees(self.deps, limit=limit, offset=offset))


class CheckHandler(AuthenHandler):
    async def get(self) -> None:
        user_id = self.query_int("user_id")
        user = await users.check(self.deps, user_id)
        if user is None:
            raise NotFound(f"no user with id {user_id}")
        self.write_json(user)


class StatusHandler(AuthenHandler):
    def get(self) -> None:
        router = self.deps.router
        body: dict = {
            "status": "ok" if router.primary.healthy else "degraded",
            "service": "authen",
            "instance": self.state.instance,
            "database": router.view(),
            "password_hashing": {"algorithm": "argon2id", **self.deps.passwords.parameters},
        }
        if self.state.settings.enable_sleepy:
            body["sleepy"] = {"received": self.state.sleepy_received, "active": self.state.sleepy_active}
        self.write_json(body)


class SleepyHandler(AuthenHandler):
    """Sleeps (capped at 60 s): demonstrates the gateway's timeouts and task limits."""

    async def _sleep(self) -> None:
        self.state.sleepy_received += 1
        seconds = sleepy_seconds(self.query_float("seconds", 5.0, minimum=0.0, maximum=float("inf")))
        self.state.sleepy_active += 1
        try:
            await asyncio.sleep(seconds)
        finally:
            self.state.sleepy_active -= 1
        self.write_json({"detail": f"slept {seconds:g} seconds", "seconds": seconds,
                         "instance": self.state.instance})

    async def get(self) -> None:
        await self._sleep()

    async def post(self) -> None:
        await self._sleep()


def routes(settings: AuthenSettings) -> list:
    table: list = [
        (r"/authen/signup", SignupHandler),
        (r"/authen/signin", SigninHandler),
        (r"/list/employee", EmployeeListHandler),
        (r"/utilities/check", CheckHandler),
        (r"/utilities/status", StatusHandler),
    ]
    if settings.enable_sleepy:
        table.append((r"/utilities/sleepy", SleepyHandler))
    return table
