"""Forwarding one request: choose an instance, admit it, send, retry where safe.

One overall deadline (``TIMEOUT_MS``) covers admission, every attempt and every backoff,
so retries never multiply it. A request is sent again, on another instance, after a
connect failure (it never reached the instance, any method), or after a timeout or a
502/503/504 for idempotent methods only: a POST that an instance received is never
replayed. Every outcome feeds that instance's circuit breaker, with the client it came
from when the client may have caused it (gateway.breaker says why).
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Sequence
from dataclasses import dataclass

import aiohttp

from common.errors import DEPENDENCY_HEADER, BadGateway, GatewayTimeout, ServiceUnavailable, TooManyRequests
from gateway.limiter import Admission, Full, Limiter, RateCharge, RateLimited
from gateway.metrics import GatewayMetrics
from gateway.policy import IDEMPOTENT_METHODS
from gateway.pool import ConnectFailed, UpstreamFailed, UpstreamPool
from gateway.settings import GatewaySettings
from gateway.upstreams import Candidate, Service

log = logging.getLogger("barber.gateway.proxy")

RETRYABLE_STATUS = frozenset({502, 503, 504})
_DEPENDENCY_HEADER = DEPENDENCY_HEADER.lower()


@dataclass(slots=True)
class UpstreamResponse:
    status: int
    reason: str | None
    headers: list[tuple[str, str]]
    body: bytes
    instance: str
    attempts: int

    @property
    def dependency_refusal(self) -> bool:
        """A 503 the instance answered because a dependency of its is down: it is healthy."""
        return self.status == 503 and any(k.lower() == _DEPENDENCY_HEADER for k, _ in self.headers)


class _AttemptFailed(Exception):
    def __init__(self, instance: str, *, reached: bool, timed_out: bool, cause: str) -> None:
        super().__init__(cause)
        self.instance = instance
        self.reached = reached
        self.timed_out = timed_out
        self.cause = cause


def make_pool(settings: GatewaySettings) -> UpstreamPool:
    """The proxy's keep-alive connections to the instances."""
    # Upstream servers close idle connections after their HEADER_TIMEOUT_S (the same
    # default as ours); we close ours well before, so no request goes out on a
    # connection the server is closing.
    return UpstreamPool(
        connect_timeout_s=settings.upstream_connect_timeout_ms / 1000,
        max_per_address=settings.upstream_max_connections,
        idle_s=min(30.0, settings.header_timeout_s / 2),
    )


def make_session(settings: GatewaySettings) -> aiohttp.ClientSession:
    """A pooled, keep-alive client for the gateway's own calls (OpenAPI fragments, the
    coordinator's participants); proxied requests go through :func:`make_pool`."""
    connector = aiohttp.TCPConnector(
        limit=0,
        limit_per_host=settings.upstream_max_connections,
        # Upstream servers close idle connections after their HEADER_TIMEOUT_S (the same
        # default as ours); we close ours well before, so no request goes out on a
        # connection the server is closing.
        keepalive_timeout=min(30.0, settings.header_timeout_s / 2),
        enable_cleanup_closed=False,
        ttl_dns_cache=300,
    )
    return aiohttp.ClientSession(
        connector=connector,
        auto_decompress=False,
        cookie_jar=aiohttp.DummyCookieJar(),
        skip_auto_headers=("User-Agent", "Accept-Encoding", "Accept", "Content-Type"),
        timeout=aiohttp.ClientTimeout(total=None, sock_connect=settings.upstream_connect_timeout_ms / 1000),
    )


class Proxy:
    def __init__(
        self,
        settings: GatewaySettings,
        services: dict[str, Service],
        limiter: Limiter,
        metrics: GatewayMetrics,
        pool: UpstreamPool,
    ) -> None:
        self.settings = settings
        self.services = services
        self.limiter = limiter
        self.metrics = metrics
        self.pool = pool
        self.least_outstanding = settings.lb_policy == "least_outstanding"
        limiter.load_threshold = settings.load_threshold_per_s_per_service
        limiter.on_load_alert = self._alert_on_load

    # -- the whole request -----------------------------------------------------------
    async def forward(
        self,
        service: Service,
        method: str,
        path_qs: str,
        headers: Sequence[tuple[str, str]],
        body: bytes | None,
        *,
        deadline: float,
        charge: RateCharge | None = None,
        client: str | None = None,
    ) -> UpstreamResponse:
        idempotent = method in IDEMPOTENT_METHODS
        tried: set[str] = set()
        last: _AttemptFailed | UpstreamResponse | None = None
        attempt = 0
        while True:
            candidates = self.candidates(service, tried, have_answer=last is not None)
            admission = (
                None
                if candidates is None
                else await self._admit(service, candidates, deadline, charge if attempt == 0 else None, last)
            )
            if admission is None:
                assert last is not None
                return self._give_up(service, last, attempt)
            chosen = next(c for c in candidates or () if c.instance.address == admission.instance)
            attempt += 1
            tried.add(admission.instance)
            result = await self._attempt_admitted(service, chosen, method, path_qs, headers, body, deadline, attempt)
            if self._settled(service, chosen, result, idempotent, client):
                return result if isinstance(result, UpstreamResponse) else self._give_up(service, result, attempt)
            last = result
            delay = self._backoff(service, tried, attempt, deadline)
            if delay is None:
                return self._give_up(service, last, attempt)
            self._count_retry(service, method, path_qs, admission.instance, result)
            if delay > 0:
                await asyncio.sleep(delay)

    # -- choosing an instance (requests and sockets) ---------------------------------
    def candidates(self, service: Service, exclude: set[str], *, have_answer: bool = False) -> list[Candidate] | None:
        """Instances a request may go to now (balanced, breaker-checked), or 503 when there
        are none; None instead when a previous attempt's answer can be given."""
        candidates, known = service.candidates(exclude)
        if candidates:
            return candidates
        if have_answer:
            return None
        raise self._unavailable(service, known)

    def record(self, service: Service, chosen: Candidate, *, ok: bool, client: str | None = None) -> None:
        """An attempt's outcome, for its instance's breaker. ``client``: who sent it, when
        the failure may be of its making (None: the instance's alone)."""
        breaker = service.breakers.get(chosen.instance.address)
        if ok:
            breaker.record_success(chosen.breaker_state)
        else:
            breaker.record_failure(chosen.breaker_state, client=client)

    async def _admit(
        self,
        service: Service,
        candidates: list[Candidate],
        deadline: float,
        charge: RateCharge | None,
        last: _AttemptFailed | UpstreamResponse | None,
    ) -> Admission | None:
        """A slot on one of ``candidates`` (None: all full after an attempt that answered)."""
        admission: Admission | None = None
        addresses = [c.instance.address for c in candidates]
        limit = self.settings.task_limit_per_service
        try:
            remaining = deadline - asyncio.get_running_loop().time()
            if remaining <= 0:
                raise TimeoutError
            # Usually decided here (a leased slot, local counts): no timer, no wait.
            admission = self.limiter.admit_now(
                addresses, limit=limit, least_outstanding=self.least_outstanding, charge=charge
            )
            if admission is None:
                async with asyncio.timeout(remaining):
                    admission = await self.limiter.admit(
                        addresses, limit=limit, least_outstanding=self.least_outstanding, charge=charge
                    )
            return admission
        except Full:
            if last is not None:
                return None
            self.metrics.rejections.labels(service.name, "task_limit").inc()
            raise ServiceUnavailable(
                f"All {service.name} instances are busy (task limit {self.settings.task_limit_per_service} "
                f"reached); try again later.",
                headers={"Retry-After": "1"},
            ) from None
        except RateLimited as e:
            self.metrics.rejections.labels(service.name, "rate_limit").inc()
            raise TooManyRequests("Too many requests; slow down.", retry_after_s=e.retry_after_s) from None
        except TimeoutError:
            raise self._timeout(service, last) from None
        finally:
            # Trial slots of half-open breakers that this request will not use go back.
            service.give_back(candidates, admission.instance if admission is not None else None)

    async def _attempt_admitted(
        self,
        service: Service,
        chosen: Candidate,
        method: str,
        path_qs: str,
        headers: Sequence[tuple[str, str]],
        body: bytes | None,
        deadline: float,
        attempt: int,
    ) -> _AttemptFailed | UpstreamResponse:
        address = chosen.instance.address
        try:
            return await self._attempt(chosen, method, path_qs, headers, body, deadline, attempt)
        except BaseException:
            service.breakers.get(address).release_unused(chosen.breaker_state)
            raise
        finally:
            self.limiter.release(address)

    def _settled(
        self,
        service: Service,
        chosen: Candidate,
        result: _AttemptFailed | UpstreamResponse,
        idempotent: bool,
        client: str | None,
    ) -> bool:
        """Record the outcome; is it final (no retry)?"""
        if isinstance(result, UpstreamResponse):
            ok = result.status < 500 or result.dependency_refusal
            self.record(service, chosen, ok=ok, client=client)
            return ok or result.status not in RETRYABLE_STATUS or not idempotent
        # A connect failure is the instance's alone; a timeout or a reset after the
        # request went may be of the request's making.
        self.record(service, chosen, ok=False, client=client if result.reached else None)
        return result.reached and not idempotent

    def _backoff(self, service: Service, tried: set[str], attempt: int, deadline: float) -> float | None:
        """The jittered wait before the next attempt (full jitter, within the deadline), or
        None: out of retries, or no other instance to try ("on another instance")."""
        if attempt > self.settings.max_retries or all(i.address in tried for i in service.instances):
            return None
        delay = random.uniform(0, self.settings.retry_backoff_ms / 1000 * 2 ** (attempt - 1))
        return None if asyncio.get_running_loop().time() + delay >= deadline else delay

    def _count_retry(
        self, service: Service, method: str, path_qs: str, instance: str, result: _AttemptFailed | UpstreamResponse
    ) -> None:
        reason = (
            "status"
            if isinstance(result, UpstreamResponse)
            else ("timeout" if result.timed_out else "connect" if not result.reached else "error")
        )
        self.metrics.retries.labels(service.name, reason).inc()
        log.info(
            "retrying %s %s on another %s instance after %s at %s",
            method,
            path_qs.split("?")[0],
            service.name,
            reason,
            instance,
            extra={
                "event.action": "retry",
                "barber.upstream.service": service.name,
                "barber.upstream.instance": instance,
                "barber.retry.reason": reason,
            },
        )

    # -- one attempt -----------------------------------------------------------------
    async def _attempt(
        self,
        chosen: Candidate,
        method: str,
        path_qs: str,
        headers: Sequence[tuple[str, str]],
        body: bytes | None,
        deadline: float,
        attempt: int,
    ) -> _AttemptFailed | UpstreamResponse:
        inst = chosen.instance
        loop = asyncio.get_running_loop()
        budget = deadline - loop.time()
        if self.settings.attempt_timeout_ms:
            budget = min(budget, self.settings.attempt_timeout_ms / 1000)
        started = time.perf_counter()
        m = self.metrics
        try:
            async with asyncio.timeout(budget):
                status, reason, resp_headers, data = await self.pool.request(
                    inst.address, method, path_qs, headers, body
                )
                return UpstreamResponse(status, reason, resp_headers, data, inst.address, attempt)
        except TimeoutError:
            return _AttemptFailed(inst.address, reached=True, timed_out=True, cause="timed out")
        except ConnectFailed as e:
            return _AttemptFailed(inst.address, reached=False, timed_out=False, cause=str(e))
        except UpstreamFailed as e:
            return _AttemptFailed(inst.address, reached=True, timed_out=False, cause=str(e)[:200])
        finally:
            m.child(m.upstream_latency, inst.address).observe(time.perf_counter() - started)

    # -- outcomes --------------------------------------------------------------------
    def _give_up(self, service: Service, last: _AttemptFailed | UpstreamResponse, attempts: int) -> UpstreamResponse:
        if isinstance(last, UpstreamResponse):
            return last
        if last.timed_out:
            raise GatewayTimeout(f"Request passed to {last.instance} has timed out.")
        self.metrics.rejections.labels(service.name, "upstream_error").inc()
        raise BadGateway(f"{service.name} instance {last.instance} failed: {last.cause}.")

    def _timeout(self, service: Service, last: _AttemptFailed | UpstreamResponse | None) -> GatewayTimeout:
        target = last.instance if last is not None else service.name
        return GatewayTimeout(f"Request passed to {target} has timed out.")

    def _unavailable(self, service: Service, known: int) -> ServiceUnavailable:
        if known == 0:
            self.metrics.rejections.labels(service.name, "no_instance").inc()
            return ServiceUnavailable(f"No {service.name} instances are available.", headers={"Retry-After": "1"})
        self.metrics.rejections.labels(service.name, "breaker_open").inc()
        return ServiceUnavailable(
            f"No healthy {service.name} instances: the circuit is open for all {known}.",
            headers={"Retry-After": "1"},
        )

    def _alert_on_load(self, instance: str, load: int, shared: bool) -> None:
        """The limiter saw ``instance`` cross the threshold this second (once per instance
        per second: over all gateways when ``shared``)."""
        threshold = self.settings.load_threshold_per_s_per_service
        name = next(
            (n for n, svc in self.services.items() if any(i.address == instance for i in svc.instances)), "unknown"
        )
        self.metrics.load_alerts.labels(name, instance).inc()
        log.warning(
            "ALERT: Load on %s [%s] has exceeded %d req/s",
            name,
            instance,
            threshold,
            extra={
                "event.kind": "alert",
                "event.category": ["network"],
                "event.type": ["info"],
                "event.action": "load-alert",
                "barber.upstream.service": name,
                "barber.upstream.instance": instance,
                "barber.load.threshold_per_s": threshold,
                "barber.load.shared": shared,
                "barber.load.per_s": load,
            },
        )

    # -- WebSocket: an instance for a long-lived connection --------------------------
    def pick_for_socket(self, service: Service, exclude: set[str]) -> Candidate:
        """An instance for a WebSocket: balanced and breaker-checked, but not counted against
        the task limit (a socket would hold a slot for its whole life)."""
        candidates = self.candidates(service, exclude)
        assert candidates
        chosen = candidates[0]
        service.give_back(candidates, chosen.instance.address)
        return chosen
