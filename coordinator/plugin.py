"""Mounts the coordinator into the gateway (see gateway.app.PLUGINS)."""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Awaitable, Callable

from tornado.httpclient import AsyncHTTPClient

from common import internal
from common.config import load_settings
from common.internal import InternalClient
from coordinator.deletion import PARTICIPANTS, Coordinator
from coordinator.handlers import routes
from coordinator.log import TxLog
from coordinator.migrations import upgrade
from coordinator.participants import ParticipantClient
from coordinator.settings import CoordinatorSettings

if TYPE_CHECKING:
    from gateway.app import Mount
    from gateway.context import GatewayContext


# Participant calls in flight at once (its own client: they never queue behind others).
MAX_CALLS = 64


def _closer(http: AsyncHTTPClient) -> "Callable[[], Awaitable[None]]":
    async def close() -> None:
        http.close()
    return close


async def mount(ctx: "GatewayContext") -> "Mount":
    from gateway.app import Mount

    settings = load_settings(CoordinatorSettings)
    await asyncio.to_thread(upgrade, settings.coordinator_database_url)
    txlog = TxLog(settings.coordinator_database_url, settings.coordinator_lease_s)
    secret = internal.read_secret(settings.service_secret_file)
    http = AsyncHTTPClient(force_instance=True, max_clients=MAX_CALLS)
    participants = {
        name: ParticipantClient(InternalClient(name, lambda name=name: ctx.services[name].instances, secret,
                                               timeout_s=settings.coordinator_participant_timeout_s, http=http))
        for name in PARTICIPANTS
    }
    coordinator = Coordinator(settings, txlog, participants, owner=f"{settings.advertise_host}:{settings.port}")
    coordinator.start()
    return Mount(routes=routes(coordinator), on_stop=[coordinator.stop, txlog.close, _closer(http)])
