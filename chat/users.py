"""User lookups: the user cache first, then authen's ``/utilities/check``.

authen instances come from a local, background-refreshed discovery view, so a lookup
never costs a registry round trip. Lookups of one user that overlap share one request.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from typing import Any

from chat.cache import UserCache
from common.discovery import InstanceView
from common.errors import DependencyUnavailable
from common.internal import InternalClient, Refused, Unreachable

log = logging.getLogger("barber.chat.users")

# authen's answers meaning "no such user": 404, or the id refused as no valid user id.
# Any other answer but a 200 is that instance failing: the next one is asked.
NO_SUCH_USER = (400, 404, 422)


class AuthenUnavailable(DependencyUnavailable):
    """No authen instance answered the lookup."""

    dependency = "authen"


@dataclass(frozen=True, slots=True)
class User:
    id: int
    username: str
    first_name: str
    last_name: str
    type: str

    @classmethod
    def from_check(cls, data: dict[str, Any]) -> User:
        return cls(
            id=int(data["id"]),
            username=str(data.get("username", "")),
            first_name=str(data.get("first_name", "")),
            last_name=str(data.get("last_name", "")),
            type=str(data.get("type", "")),
        )

    def as_check(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "username": self.username,
            "first_name": self.first_name,
            "last_name": self.last_name,
            "type": self.type,
        }

    def public(self) -> dict[str, Any]:
        """What other users see of this one (message senders, chat partners)."""
        return {"id": self.id, "first_name": self.first_name, "last_name": self.last_name}


class UserDirectory:
    def __init__(
        self, view: InstanceView, cache: UserCache, *, timeout_s: float = 3.0, secret: str | None = None
    ) -> None:
        self.view = view
        self.cache = cache
        self.timeout_s = timeout_s
        self.authen = InternalClient(
            "authen",
            lambda: view.instances,
            secret,
            timeout_s=timeout_s,
            connect_timeout_s=min(1.0, timeout_s),
            refusals=NO_SUCH_USER,
        )
        self._inflight: dict[int, asyncio.Future[User | None]] = {}

    @property
    def authen_calls(self) -> int:
        return self.authen.calls

    @property
    def authen_failures(self) -> int:
        return self.authen.failures

    async def get(self, user_id: int) -> User | None:
        """The user, or None if authen says there is no such user.

        Raises :class:`AuthenUnavailable` when neither the cache nor any authen
        instance can answer."""
        pending = self._inflight.get(user_id)
        if pending is not None:
            try:
                return await asyncio.shield(pending)
            except asyncio.CancelledError:
                task = asyncio.current_task()
                if not pending.cancelled() or (task is not None and task.cancelling()):
                    raise
                # The leading lookup was cancelled by its own caller: look up ourselves.
                return await self._lookup(user_id)
        fut: asyncio.Future[User | None] = asyncio.get_running_loop().create_future()
        self._inflight[user_id] = fut
        try:
            user = await self._lookup(user_id)
        except asyncio.CancelledError:
            fut.cancel()
            raise
        except Exception as e:
            fut.set_exception(e)
            # Mark it retrieved: with no other waiter asyncio would log it as lost.
            fut.exception()
            raise
        else:
            fut.set_result(user)
            return user
        finally:
            del self._inflight[user_id]

    async def _lookup(self, user_id: int) -> User | None:
        cached = await self.cache.get(user_id)
        if cached is not None:
            try:
                return User.from_check(cached)
            except (KeyError, TypeError, ValueError):
                log.warning("ignoring malformed cache entry for user#%d", user_id)
        data = await self.check(user_id)
        if data is None:
            return None
        user = User.from_check(data)
        await self.cache.put(user_id, user.as_check())
        return user

    async def check(self, user_id: int) -> dict[str, Any] | None:
        """authen's answer for ``user_id`` (None when there is no such user), trying each
        instance once; when none answers, the error names every instance's failure."""
        try:
            return await self.authen.call("GET", f"/utilities/check?user_id={user_id}", accept=_check_answer)
        except Refused:
            return None  # 404, or authen refused the id itself (not a valid user id)
        except Unreachable as e:
            if not e.errors:
                raise AuthenUnavailable("no authen instance is available") from e
            raise AuthenUnavailable(f"authen unavailable: {'; '.join(e.errors)}") from e


def _check_answer(data: Any) -> None:
    int(data["id"])
