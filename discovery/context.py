"""Everything a discovery handler needs, built once by :mod:`discovery.app`."""

from __future__ import annotations

from dataclasses import dataclass

from discovery.registry import Registry, Watchers
from discovery.settings import DiscoverySettings


@dataclass
class DiscoveryContext:
    settings: DiscoverySettings
    registry: Registry
    # Long polls waiting for a change of their type's instances.
    watchers: Watchers
