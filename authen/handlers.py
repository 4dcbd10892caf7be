"""authen's HTTP handlers: parse, call a domain function from ``authen.users``, write JSON.
Routes are at the bottom."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

from authen import participant, users
from authen.schemas import (
    SLEEPY_MAX_S,
    CheckQuery,
    Employee,
    EmployeeQuery,
    SignupResult,
    SleepyQuery,
    SleepyResult,
    UserProfile,
)
from authen.settings import AuthenSettings
from common.errors import BadRequest, NotFound
from common.handler import BaseHandler
from common.openapi import StatusBody, api
from common.participant import PrepareRequest, crash_point

DEPS = "authen.deps"
STATE = "authen.state"

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
    @api("Sign up as a customer or an employee", body=users.SignupRequest, responses={201: SignupResult},
         errors=(409,))
    async def post(self) -> None:
        req = self.parse_body(users.SignupRequest)
        user_id = await users.signup(self.deps, req)
        self.write_json({"detail": "user created", "user_id": user_id}, status=201)


class SigninHandler(AuthenHandler):
    @api("Sign in: a bearer token", body=users.SigninRequest, responses={200: users.SigninResult},
         errors=(401, 429))
    async def post(self) -> None:
        req = self.parse_body(users.SigninRequest)
        self.write_json(await users.signin(self.deps, req, self.client_ip()))


class EmployeeListHandler(AuthenHandler):
    @api("The barbers (employees), by id", query=EmployeeQuery, responses={200: list[Employee]})
    async def get(self) -> None:
        q = self.parse_query(EmployeeQuery)
        self.write_json(await users.list_employees(self.deps, limit=q.limit, offset=q.offset))


class CheckHandler(AuthenHandler):
    @api("An active user's public profile", query=CheckQuery, responses={200: UserProfile}, errors=(404,))
    async def get(self) -> None:
        user_id = self.parse_query(CheckQuery).user_id
        user = await users.check(self.deps, user_id)
        if user is None:
            raise NotFound(f"no user with id {user_id}")
        self.write_json(user)


class StatusHandler(AuthenHandler):
    """Public: up or degraded. Database addresses, errors and counters only for callers
    with the service credential or an admin token."""

    @api("This instance's health (details for services and admins)", responses={200: StatusBody})
    def get(self) -> None:
        router = self.deps.router
        body: dict = {
            "status": "ok" if router.primary.healthy else "degraded",
            "service": "authen",
            "instance": self.state.instance,
        }
        if not self.may_see_details():
            self.write_json(body)
            return
        passwords = self.deps.passwords
        body["database"] = router.view()
        body["password_hashing"] = {"algorithm": "argon2id", **passwords.parameters, "pending": passwords.pending,
                                    "queue_max": passwords.max_pending, "shed": passwords.shed,
                                    "hashed": passwords.hashed}
        if self.state.settings.enable_sleepy:
            body["sleepy"] = {"received": self.state.sleepy_received, "active": self.state.sleepy_active}
        self.write_json(body)


class SleepyHandler(AuthenHandler):
    """Sleeps (capped at 60 s): demonstrates the gateway's timeouts and task limits."""

    async def _sleep(self) -> None:
        self.state.sleepy_received += 1
        seconds = sleepy_seconds(self.parse_query(SleepyQuery).seconds)
        self.state.sleepy_active += 1
        try:
            await asyncio.sleep(seconds)
        finally:
            self.state.sleepy_active -= 1
        self.write_json({"detail": f"slept {seconds:g} seconds", "seconds": seconds,
                         "instance": self.state.instance})

    @api("Sleep (a test aid: only with ENABLE_SLEEPY=1)", query=SleepyQuery, responses={200: SleepyResult})
    async def get(self) -> None:
        await self._sleep()

    @api("Sleep (a test aid: only with ENABLE_SLEEPY=1)", query=SleepyQuery, responses={200: SleepyResult})
    async def post(self) -> None:
        await self._sleep()


# -- internal: the deletion coordinator's participant endpoints (service credential only) --
class InternalHandler(AuthenHandler):
    def prepare(self) -> None:
        super().prepare()
        self.require_service()

    async def revoke(self, user_id: int) -> None:
        await users.revoke_tokens(self.deps, user_id)


class TxActionHandler(InternalHandler):
    async def post(self, gid: str, action: str) -> None:
        router = self.deps.router
        if action == "prepare":
            req = self.parse_body(PrepareRequest)
            settings = self.state.settings
            state = await participant.prepare(
                router, gid, req.user_id,
                after_prepare=lambda: crash_point(settings.barber_test_hooks, settings.participant_crash_at,
                                                  "after_prepare"))
        elif action == "commit":
            state = await participant.commit(router, gid, self.revoke)
        else:
            state = await participant.abort(router, gid)
        self.write_json({"gid": gid, "state": state})


class TxStatusHandler(InternalHandler):
    async def get(self, gid: str) -> None:
        self.write_json({"gid": gid, "state": await participant.state_of(self.deps.router, gid)})


class TxListHandler(InternalHandler):
    async def get(self) -> None:
        if self.get_query_argument("state", "prepared") != "prepared":
            raise BadRequest("state: only 'prepared' can be listed")
        self.write_json({"transactions": await participant.prepared(self.deps.router)})


class UserActivationHandler(InternalHandler):
    async def post(self, user_id: str, action: str) -> None:
        self.write_json(await participant.set_active(self.deps.router, int(user_id), action == "reactivate",
                                                     self.revoke))


class InternalUserHandler(InternalHandler):
    async def delete(self, user_id: str) -> None:
        self.write_json(await participant.delete_user(self.deps.router, int(user_id), self.revoke))


def routes(settings: AuthenSettings) -> list:
    table: list = [
        (r"/authen/signup", SignupHandler),
        (r"/authen/signin", SigninHandler),
        (r"/list/employee", EmployeeListHandler),
        (r"/utilities/check", CheckHandler),
        (r"/utilities/status", StatusHandler),
        (r"/internal/tx", TxListHandler),
        (r"/internal/tx/([^/]+)", TxStatusHandler),
        (r"/internal/tx/([^/]+)/(prepare|commit|abort)", TxActionHandler),
        (r"/internal/users/([0-9]{1,18})/(deactivate|reactivate)", UserActivationHandler),
        (r"/internal/users/([0-9]{1,18})", InternalUserHandler),
    ]
    if settings.enable_sleepy:
        table.append((r"/utilities/sleepy", SleepyHandler))
    return table
