"""authen's HTTP handlers: parse, call a domain function from ``authen.users``, write JSON.
Routes are at the bottom."""

from __future__ import annotations

import asyncio

from authen import users
from authen.context import AuthenContext
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
from common.errors import NotFound
from common.handler import CONTEXT, BaseHandler
from common.openapi import StatusBody, api
from common.participant import tx_routes


def sleepy_seconds(requested: float) -> float:
    """Sleepy never holds a request longer than a minute, whatever is asked."""
    return min(requested, SLEEPY_MAX_S)


class AuthenHandler(BaseHandler):
    @property
    def context(self) -> AuthenContext:
        return self.settings[CONTEXT]


class SignupHandler(AuthenHandler):
    @api("Sign up as a customer or an employee", body=users.SignupRequest, responses={201: SignupResult}, errors=(409,))
    async def post(self) -> None:
        req = self.parse_body(users.SignupRequest)
        user_id = await users.signup(self.context.deps, req)
        self.write_json({"detail": "user created", "user_id": user_id}, status=201)


class SigninHandler(AuthenHandler):
    @api("Sign in: a bearer token", body=users.SigninRequest, responses={200: users.SigninResult}, errors=(401, 429))
    async def post(self) -> None:
        req = self.parse_body(users.SigninRequest)
        self.write_json(await users.signin(self.context.deps, req, self.client_ip()))


class EmployeeListHandler(AuthenHandler):
    @api("The barbers (employees), by id", query=EmployeeQuery, responses={200: list[Employee]})
    async def get(self) -> None:
        q = self.parse_query(EmployeeQuery)
        self.write_json(await users.list_employees(self.context.deps, limit=q.limit, offset=q.offset))


class CheckHandler(AuthenHandler):
    @api("An active user's public profile", query=CheckQuery, responses={200: UserProfile}, errors=(404,))
    async def get(self) -> None:
        user_id = self.parse_query(CheckQuery).user_id
        user = await users.check(self.context.deps, user_id)
        if user is None:
            raise NotFound(f"no user with id {user_id}")
        self.write_json(user)


class StatusHandler(AuthenHandler):
    """Public: up or degraded. Database addresses, errors and counters only for callers
    with the service credential or an admin token."""

    @api("This instance's health (details for services and admins)", responses={200: StatusBody})
    def get(self) -> None:
        router = self.context.deps.router
        body: dict = {
            "status": "ok" if router.primary.healthy else "degraded",
            "service": "authen",
            "instance": self.context.instance,
        }
        if not self.may_see_details():
            self.write_json(body)
            return
        passwords = self.context.deps.passwords
        body["database"] = router.view()
        body["password_hashing"] = {
            "algorithm": "argon2id",
            **passwords.parameters,
            "pending": passwords.pending,
            "queue_max": passwords.max_pending,
            "shed": passwords.shed,
            "hashed": passwords.hashed,
        }
        if self.context.settings.enable_sleepy:
            body["sleepy"] = {"received": self.context.sleepy_received, "active": self.context.sleepy_active}
        self.write_json(body)


class SleepyHandler(AuthenHandler):
    """Sleeps (capped at 60 s): demonstrates the gateway's timeouts and task limits."""

    async def _sleep(self) -> None:
        self.context.sleepy_received += 1
        seconds = sleepy_seconds(self.parse_query(SleepyQuery).seconds)
        self.context.sleepy_active += 1
        try:
            await asyncio.sleep(seconds)
        finally:
            self.context.sleepy_active -= 1
        self.write_json({"detail": f"slept {seconds:g} seconds", "seconds": seconds, "instance": self.context.instance})

    @api("Sleep (a test aid: only with ENABLE_SLEEPY=1)", query=SleepyQuery, responses={200: SleepyResult})
    async def get(self) -> None:
        await self._sleep()

    @api("Sleep (a test aid: only with ENABLE_SLEEPY=1)", query=SleepyQuery, responses={200: SleepyResult})
    async def post(self) -> None:
        await self._sleep()


# -- internal: the saga steps of the deletion coordinator (service credential only); the
# two-phase-commit endpoints are common.participant's --
class InternalHandler(AuthenHandler):
    def prepare(self) -> None:
        super().prepare()
        self.require_service()


class UserActivationHandler(InternalHandler):
    async def post(self, user_id: str, action: str) -> None:
        self.write_json(await self.context.participant.set_active(int(user_id), action == "reactivate"))


class InternalUserHandler(InternalHandler):
    async def delete(self, user_id: str) -> None:
        self.write_json(await self.context.participant.delete_user(int(user_id)))


def routes(settings: AuthenSettings) -> list:
    table: list = [
        (r"/authen/signup", SignupHandler),
        (r"/authen/signin", SigninHandler),
        (r"/list/employee", EmployeeListHandler),
        (r"/utilities/check", CheckHandler),
        (r"/utilities/status", StatusHandler),
        *tx_routes(),
        (r"/internal/users/([0-9]{1,18})/(deactivate|reactivate)", UserActivationHandler),
        (r"/internal/users/([0-9]{1,18})", InternalUserHandler),
    ]
    if settings.enable_sleepy:
        table.append((r"/utilities/sleepy", SleepyHandler))
    return table
