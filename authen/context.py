"""Everything an authen handler needs, built once by :mod:`authen.app`."""

from __future__ import annotations

from dataclasses import dataclass

from authen.participant import AuthenParticipant
from authen.settings import AuthenSettings
from authen.users import Deps


@dataclass
class AuthenContext:
    settings: AuthenSettings
    # The account functions' stores and helpers (authen.users).
    deps: Deps
    participant: AuthenParticipant
    instance: str
    sleepy_received: int = 0
    sleepy_active: int = 0
