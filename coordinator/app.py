"""Builds the deletion coordinator, to be mounted into a host process (the gateway).

The host lends it only what :class:`Host` names; the coordinator brings everything else
(its settings, its log's database, its participant client, its recovery task) and hands
back a :class:`common.service.Mount`: its routes, its context and its closers.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from tornado.httpclient import AsyncHTTPClient

from common import internal
from common.discovery import Instance
from common.internal import InternalClient
from common.service import Mount
from coordinator.context import CoordinatorContext
from coordinator.deletion import PARTICIPANTS, Coordinator
from coordinator.handlers import routes
from coordinator.log import TxLog
from coordinator.migrations import upgrade
from coordinator.participants import ParticipantClient
from coordinator.settings import CoordinatorSettings

# Participant calls in flight at once, on a client of their own (they never queue behind
# the host's other calls).
MAX_CALLS = 64


@dataclass(frozen=True)
class Host:
    """All the coordinator takes from the process it is mounted in."""

    # The live instances of a participant service ("authen", "chat"), from the host's
    # discovery views (read on every call: never a registry round trip).
    instances: Callable[[str], Sequence[Instance]]


async def build(settings: CoordinatorSettings, host: Host) -> Mount:
    await asyncio.to_thread(upgrade, settings.coordinator_database_url)
    txlog = TxLog(settings.coordinator_database_url, settings.coordinator_lease_s)
    secret = internal.read_secret(settings.service_secret_file)
    http = AsyncHTTPClient(force_instance=True, max_clients=MAX_CALLS)

    def client(name: str) -> ParticipantClient:
        return ParticipantClient(
            InternalClient(
                name,
                lambda: host.instances(name),
                secret,
                timeout_s=settings.coordinator_participant_timeout_s,
                http=http,
            )
        )

    participants = {name: client(name) for name in PARTICIPANTS}
    coordinator = Coordinator(settings, txlog, participants, owner=f"{settings.advertise_host}:{settings.port}")
    coordinator.start()

    async def close() -> None:
        await coordinator.stop()
        await txlog.close()
        http.close()

    return Mount(routes=routes(), context=CoordinatorContext(settings, coordinator), on_stop=[close])
