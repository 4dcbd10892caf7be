"""Mounts the coordinator into the gateway (see gateway.app.PLUGINS)."""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING

from common import internal
from common.config import load_settings
from common.logs import request_id_var
from coordinator.deletion import PARTICIPANTS, Coordinator
from coordinator.handlers import routes
from coordinator.log import TxLog
from coordinator.migrations import upgrade
from coordinator.participants import Participant
from coordinator.settings import CoordinatorSettings

if TYPE_CHECKING:
    from gateway.app import Mount
    from gateway.context import GatewayContext


async def mount(ctx: GatewayContext) -> Mount:
    from gateway.app import Mount

    settings = load_settings(CoordinatorSettings)
    await asyncio.to_thread(upgrade, settings.coordinator_database_url)
    txlog = TxLog(settings.coordinator_database_url, settings.coordinator_lease_s)
    secret = internal.read_secret(settings.service_secret_file)
    participants = {
        name: Participant(name, lambda name=name: ctx.services[name].instances, ctx.session, secret,
                          settings.coordinator_participant_timeout_s, request_id=request_id_var.get)
        for name in PARTICIPANTS
    }
    coordinator = Coordinator(settings, txlog, participants, owner=f"{settings.advertise_host}:{settings.port}")
    coordinator.start()
    return Mount(routes=routes(coordinator), on_stop=[coordinator.stop, txlog.close])
