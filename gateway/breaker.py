"""A circuit breaker per upstream instance: closed -> open -> half-open -> closed.

closed      every request may go; consecutive failures, or a failure rate over the
            window (with enough requests), open it, but only when failures came from
            at least ``min_clients`` distinct clients (see below).
open        no request goes until a jittered wait passes (it grows on each reopening,
            up to a cap), so instances that failed together do not all return at once.
half-open   at most ``trials`` requests go; all of them succeeding closes it, any one
            failing opens it again. An instance is never removed for good.

Whose failure is it? Modelled on Envoy's outlier detection, which tells failures the
proxy sees itself (connect errors) from answers a request chose, and needs a minimum
volume: a failure a client may have caused by what it sent (a 5xx, a timeout, a reset
after the request went) is recorded with that client, and such failures trip the
breaker only when ``min_clients`` distinct clients had them (in the current run of
consecutive failures, or in the window). A connect failure is the instance's alone and
counts as if from a client of its own. So one client sending requests that fail or hang
on purpose cannot take an instance out for everyone; an instance that fails for
everybody still trips as before. (docs/gateway-hardening.md)

Plain code on a monotonic clock, no I/O: the proxy reports outcomes, the balancer asks.
"""

from __future__ import annotations

import logging
import random
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum

log = logging.getLogger("barber.gateway.breaker")


class State(str, Enum):
    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half_open"


@dataclass(frozen=True)
class BreakerConfig:
    failures: int = 5
    failure_rate: float = 0.5
    window_s: float = 10.0
    min_requests: int = 20
    open_s: float = 5.0
    open_max_s: float = 30.0
    half_open_trials: int = 3
    # Distinct clients whose failures it takes to trip (gateway-side failures count as
    # a client each).
    min_clients: int = 3
    # Re-admission waits are drawn from open_s * [1 - jitter, 1 + jitter].
    jitter: float = 0.3


Listener = Callable[[str, State, State], None]


class CircuitBreaker:
    def __init__(
        self,
        name: str,
        config: BreakerConfig,
        *,
        clock: Callable[[], float] = time.monotonic,
        on_transition: Listener | None = None,
    ) -> None:
        self.name = name
        self.config = config
        self._clock = clock
        self._on_transition = on_transition
        self.state = State.CLOSED
        self.consecutive_failures = 0
        self.open_until = 0.0
        self.reopen_count = 0
        self.trials_in_flight = 0
        self.trial_successes = 0
        # Clients with failures in the current run of consecutive failures (at most
        # min_clients of them are kept: that is all the decision needs).
        self._run_clients: set[str] = set()
        # (second, requests, failures, failing clients) buckets over the window.
        self._buckets: deque[tuple[int, list[int], set[str]]] = deque()
        self._anonymous = 0

    # -- asking ----------------------------------------------------------------------
    def _refresh(self) -> None:
        if self.state is State.OPEN and self._clock() >= self.open_until:
            self._transition(State.HALF_OPEN)
            self.trials_in_flight = 0
            self.trial_successes = 0

    def current(self) -> State:
        self._refresh()
        return self.state

    def try_acquire(self) -> bool:
        """May a request go to this instance now? In half-open this takes a trial slot."""
        self._refresh()
        if self.state is State.CLOSED:
            return True
        if (
            self.state is State.HALF_OPEN
            and self.trials_in_flight + self.trial_successes < self.config.half_open_trials
        ):
            self.trials_in_flight += 1
            return True
        return False

    def release_unused(self, acquired_state: State) -> None:
        """Give back a slot taken by :meth:`try_acquire` for a request that did not go."""
        if acquired_state is State.HALF_OPEN and self.state is State.HALF_OPEN and self.trials_in_flight > 0:
            self.trials_in_flight -= 1

    # -- outcomes --------------------------------------------------------------------
    def _bucket(self) -> tuple[int, list[int], set[str]]:
        now = int(self._clock())
        horizon = now - self.config.window_s
        while self._buckets and self._buckets[0][0] <= horizon:
            self._buckets.popleft()
        if not self._buckets or self._buckets[-1][0] != now:
            self._buckets.append((now, [0, 0], set()))
        return self._buckets[-1]

    def record_success(self, acquired_state: State = State.CLOSED) -> None:
        self._bucket()[1][0] += 1
        self.consecutive_failures = 0
        self._run_clients.clear()
        if acquired_state is State.HALF_OPEN and self.state is State.HALF_OPEN:
            self.trials_in_flight = max(0, self.trials_in_flight - 1)
            self.trial_successes += 1
            if self.trial_successes >= self.config.half_open_trials:
                self.reopen_count = 0
                self._buckets.clear()
                self._run_clients.clear()
                self._transition(State.CLOSED)

    def record_failure(self, acquired_state: State = State.CLOSED, *, client: str | None = None) -> None:
        """A failed request; ``client`` is who sent it when the failure may be of its own
        making, None for a failure of the instance alone (it could not connect)."""
        if client is None:
            # A client of its own, never equal to another (a NUL cannot be in a real key).
            self._anonymous += 1
            client = f"\0{self._anonymous}"
        _, counts, clients = self._bucket()
        counts[0] += 1
        counts[1] += 1
        need = self.config.min_clients
        if len(clients) < need:
            clients.add(client)
        self.consecutive_failures += 1
        if len(self._run_clients) < need:
            self._run_clients.add(client)
        if self.state is State.HALF_OPEN:
            if acquired_state is State.HALF_OPEN:
                self.trials_in_flight = max(0, self.trials_in_flight - 1)
            self.reopen_count += 1
            self._open()
            return
        if self.state is State.OPEN:
            return
        c = self.config
        if self.consecutive_failures >= c.failures and len(self._run_clients) >= need:
            self._open()
            return
        total = sum(x[1][0] for x in self._buckets)
        failed = sum(x[1][1] for x in self._buckets)
        if total >= c.min_requests and failed / total >= c.failure_rate and self._window_clients(need) >= need:
            self._open()

    def _window_clients(self, need: int) -> int:
        """Distinct failing clients over the window (counted up to ``need``)."""
        seen: set[str] = set()
        for _, _, clients in self._buckets:
            seen |= clients
            if len(seen) >= need:
                break
        return len(seen)

    def _open(self) -> None:
        c = self.config
        base = min(c.open_max_s, c.open_s * 2**self.reopen_count)
        wait = base * random.uniform(1 - c.jitter, 1 + c.jitter)
        self.open_until = self._clock() + wait
        self._transition(State.OPEN)

    def _transition(self, new: State) -> None:
        old, self.state = self.state, new
        if old is new:
            return
        if self._on_transition is not None:
            self._on_transition(self.name, old, new)

    def snapshot(self) -> dict[str, object]:
        self._refresh()
        out: dict[str, object] = {"state": self.state.value, "consecutive_failures": self.consecutive_failures}
        if self.state is State.OPEN:
            out["retry_in_s"] = round(max(0.0, self.open_until - self._clock()), 3)
        if self.state is State.HALF_OPEN:
            out["trials_in_flight"] = self.trials_in_flight
            out["trial_successes"] = self.trial_successes
        return out
