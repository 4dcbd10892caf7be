"""Everything a coordinator handler needs, built once by :mod:`coordinator.app`."""

from __future__ import annotations

from dataclasses import dataclass

from coordinator.deletion import Coordinator
from coordinator.settings import CoordinatorSettings


@dataclass
class CoordinatorContext:
    settings: CoordinatorSettings
    # Drives deletions and recovery; its log is ``coordinator.txlog``.
    coordinator: Coordinator
