"""Everything a chat handler needs, built once by :mod:`chat.app`."""

from __future__ import annotations

from dataclasses import dataclass

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
    participant: ChatParticipant

    @property
    def instance(self) -> str:
        return f"{self.settings.advertise_host}:{self.settings.port}"
