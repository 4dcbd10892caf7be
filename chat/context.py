"""Everything a chat handler needs, built once by :mod:`chat.app` and reached as
``self.context`` (``make_app(settings, routes(), context=ctx)``)."""

from __future__ import annotations

from dataclasses import dataclass

from prometheus_client import CollectorRegistry

from chat.cache import UserCache
from chat.fanout import Hub
from chat.participant import ChatParticipant
from chat.settings import ChatSettings
from chat.sockets import UserSockets
from chat.store import Store
from chat.users import UserDirectory


@dataclass
class ChatContext:
    settings: ChatSettings
    store: Store
    cache: UserCache
    users: UserDirectory
    hub: Hub
    sockets: UserSockets
    # The deletion coordinator's side of chat (the /internal/tx and purge routes).
    participant: ChatParticipant
    # What /metrics renders (chat.metrics.make_registry).
    metrics: CollectorRegistry

    @property
    def instance(self) -> str:
        return f"{self.settings.advertise_host}:{self.settings.port}"
