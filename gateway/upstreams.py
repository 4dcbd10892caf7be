"""What the gateway knows of each routed service: its instances, their breakers, the
round-robin position. Instances come from discovery's background-refreshed view
(:class:`common.discovery.InstanceView`), so choosing one never costs a round trip, and
routing goes on with the last view while discovery is down.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

from common.discovery import Instance, InstanceView
from gateway.breaker import BreakerConfig, CircuitBreaker, State

log = logging.getLogger("barber.gateway.upstreams")


@dataclass(frozen=True, slots=True)
class Candidate:
    instance: Instance
    # The breaker state the slot was taken in (half-open slots are trial slots).
    breaker_state: State


class Service:
    def __init__(self, name: str, view: InstanceView, breakers: Breakers) -> None:
        self.name = name
        self.view = view
        self.breakers = breakers
        self._rr = 0

    @property
    def instances(self) -> tuple[Instance, ...]:
        return self.view.instances

    def candidates(self, exclude: set[str]) -> tuple[list[Candidate], int]:
        """Instances a request may go to now, in round-robin order, and how many exist.

        Open breakers are skipped; a half-open one yields a trial slot, which the caller
        gives back (:meth:`give_back`) for candidates it does not use.
        """
        instances = self.instances
        n = len(instances)
        if n == 0:
            return [], 0
        start = self._rr % n
        self._rr += 1
        out: list[Candidate] = []
        for k in range(n):
            inst = instances[(start + k) % n]
            if inst.address in exclude:
                continue
            breaker = self.breakers.get(inst.address)
            state = breaker.current()
            if breaker.try_acquire():
                out.append(Candidate(inst, state))
        return out, n

    def give_back(self, candidates: list[Candidate], used: str | None) -> None:
        for c in candidates:
            if c.instance.address != used:
                self.breakers.get(c.instance.address).release_unused(c.breaker_state)


class Breakers:
    """One breaker per instance address; kept when an instance leaves the view, so a
    process restarted on the same address is not trusted blindly."""

    def __init__(self, config: BreakerConfig, on_transition: Callable[[str, State, State], None]) -> None:
        self.config = config
        self._on_transition = on_transition
        self._by_address: dict[str, CircuitBreaker] = {}

    def get(self, address: str) -> CircuitBreaker:
        b = self._by_address.get(address)
        if b is None:
            b = self._by_address[address] = CircuitBreaker(address, self.config, on_transition=self._on_transition)
        return b

    def known(self) -> dict[str, CircuitBreaker]:
        return dict(self._by_address)
