"""Client side of discovery: register-and-heartbeat, and a local view of instances.

Protocol (served by ``discovery/``):
  POST   /register {type, host, port}      -> 201 {instance_id, ttl}
  PUT    /register/<instance_id>            -> 200 {instance_id, ttl}; 404 once expired
  DELETE /register/<instance_id>            -> 200
  GET    /services/<type>?version=V&wait=S  -> 200 {type, version, instances: [...]}
         (long poll: with the current version, answers when it changes or after S s)
Registration calls carry the service credential header.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from tornado.httpclient import AsyncHTTPClient, HTTPClientError, HTTPRequest

from common.internal import SERVICE_TOKEN_HEADER
from common.tasks import backoff_delay, cancel_and_wait

log = logging.getLogger("barber.discovery.client")


@dataclass(frozen=True, slots=True)
class Instance:
    instance_id: str
    type: str
    host: str
    port: int
    # "host:port" and "http://host:port", made once: callers read them on every request.
    address: str = field(init=False, compare=False, repr=False)
    url: str = field(init=False, compare=False, repr=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "address", f"{self.host}:{self.port}")
        object.__setattr__(self, "url", f"http://{self.host}:{self.port}")


class Registration:
    """Registers this instance, heartbeats under the TTL, re-registers after an outage."""

    def __init__(self, discovery_url: str, type_: str, host: str, port: int, service_secret: str) -> None:
        self._base = discovery_url.rstrip("/")
        self.body = {"type": type_, "host": host, "port": port}
        self._headers = {SERVICE_TOKEN_HEADER: service_secret, "Content-Type": "application/json"}
        self.instance_id: str | None = None
        self.ttl_s = 10.0
        self._task: asyncio.Task[None] | None = None
        self.registered = asyncio.Event()

    async def _call(self, method: str, path: str, body: dict[str, Any] | None = None) -> dict[str, Any]:
        req = HTTPRequest(
            self._base + path,
            method=method,
            headers=self._headers,
            body=json.dumps(body) if body is not None else ("" if method in ("POST", "PUT") else None),
            request_timeout=5,
            connect_timeout=2,
        )
        resp = await AsyncHTTPClient().fetch(req)
        reply: dict[str, Any] = json.loads(resp.body or b"{}")
        return reply

    async def _register(self) -> None:
        reply = await self._call("POST", "/register", self.body)
        self.instance_id = reply["instance_id"]
        self.ttl_s = float(reply.get("ttl", self.ttl_s))
        self.registered.set()
        log.info("registered %s as %s", self.body, self.instance_id)

    async def _loop(self) -> None:
        attempt = 0
        while True:
            try:
                if self.instance_id is None:
                    await self._register()
                else:
                    try:
                        await self._call("PUT", f"/register/{self.instance_id}")
                    except HTTPClientError as e:
                        if e.code != 404:
                            raise
                        log.warning("registration %s expired; registering again", self.instance_id)
                        self.instance_id = None
                        continue
                attempt = 0
                await asyncio.sleep(self.ttl_s / 3)
            except asyncio.CancelledError:
                raise
            except Exception as e:  # discovery down or answering oddly: keep trying, with backoff
                attempt += 1
                delay = backoff_delay(attempt, base=0.25)
                # One warning per outage; the retries that follow are debug noise.
                log.log(
                    logging.WARNING if attempt == 1 else logging.DEBUG,
                    "discovery unreachable (%s); retrying in %.1fs",
                    e,
                    delay,
                )
                await asyncio.sleep(delay)

    def start(self) -> None:
        self._task = asyncio.create_task(self._loop())

    async def stop(self) -> None:
        await cancel_and_wait(self._task)
        if self.instance_id is not None:
            try:
                await self._call("DELETE", f"/register/{self.instance_id}")
                log.info("deregistered %s", self.instance_id)
            except Exception as e:  # the TTL removes it anyway
                log.warning("could not deregister %s: %s", self.instance_id, e)


class InstanceView:
    """A local, background-refreshed list of the live instances of one type.

    Callers read :attr:`instances` on their hot path; it never costs a round trip.
    When discovery is down the last view is kept. When discovery comes back after an
    outage, or its registry lost its data (a new epoch in the version), instances may be
    missing only because they have not re-registered yet; for ``carry_over_s`` the
    previous instances are kept beside the fresh list, so routing does not stop while
    they do (a caller's breaker keeps it from one that is really gone).
    """

    def __init__(self, discovery_url: str, type_: str, *, wait_s: float = 20.0, carry_over_s: float = 10.0) -> None:
        self._base = discovery_url.rstrip("/")
        self.type = type_
        self.instances: tuple[Instance, ...] = ()
        self.version: str | None = None
        self._wait_s = wait_s
        self._carry_over_s = carry_over_s
        self._carried: tuple[Instance, ...] = ()
        self._carry_until = 0.0
        self._fresh: tuple[Instance, ...] = ()
        self._task: asyncio.Task[None] | None = None
        self._listeners: list[Callable[[tuple[Instance, ...]], None]] = []
        self.loaded = asyncio.Event()
        # Whether the last refresh reached discovery, and when one last did (monotonic s).
        self.reachable = False
        self.last_ok: float | None = None
        # A client of its own: a long poll holds a connection slot for up to wait_s, which
        # must not starve the shared client that the service uses for its own calls.
        self._http = AsyncHTTPClient(force_instance=True)

    def on_change(self, listener: Callable[[tuple[Instance, ...]], None]) -> None:
        self._listeners.append(listener)

    @property
    def carrying(self) -> bool:
        return bool(self._carried) and time.monotonic() < self._carry_until

    async def refresh(self, wait_s: float = 0) -> None:
        url = f"{self._base}/services/{self.type}"
        if self.carrying:
            wait_s = min(wait_s, max(0.0, self._carry_until - time.monotonic()))
        if self.version is not None and wait_s > 0:
            url += f"?version={self.version}&wait={wait_s:.3f}"
        was_reachable = self.reachable or self.version is None
        resp = await self._http.fetch(url, request_timeout=wait_s + 5, connect_timeout=2)
        data = json.loads(resp.body)
        self.reachable = True
        self.last_ok = time.monotonic()
        fresh = tuple(
            sorted(
                (Instance(i["instance_id"], i["type"], i["host"], int(i["port"])) for i in data["instances"]),
                key=lambda i: i.instance_id,
            )
        )
        version = str(data.get("version"))
        epoch_changed = self.version is not None and version.split(".")[0] != self.version.split(".")[0]
        if (epoch_changed or not was_reachable) and self.instances and self._carry_over_s > 0:
            self._carried = self.instances
            self._carry_until = time.monotonic() + self._carry_over_s
            log.info(
                "carrying %d %s instance(s) over for %.0fs while they re-register",
                len(self._carried),
                self.type,
                self._carry_over_s,
            )
        self.version = version
        self._fresh = fresh
        self._publish()
        self.loaded.set()

    def _publish(self) -> None:
        instances = self._fresh
        if self._carried:
            if self.carrying:
                known = {i.address for i in self._fresh}
                instances = self._fresh + tuple(i for i in self._carried if i.address not in known)
                if len(instances) == len(self._fresh):
                    self._carried = ()  # all of them are back
            else:
                self._carried = ()
        if instances != self.instances:
            self.instances = instances
            for listener in self._listeners:
                listener(instances)

    async def _loop(self) -> None:
        attempt = 0
        while True:
            try:
                version, started = self.version, time.monotonic()
                await self.refresh(self._wait_s)
                attempt = 0
                if self.version == version and time.monotonic() - started < 0.05:
                    # The server answered at once with nothing new (it does not long-poll).
                    await asyncio.sleep(0.5)
            except asyncio.CancelledError:
                raise
            except Exception as e:  # keep the last view; try again with backoff
                self.reachable = False
                attempt += 1
                delay = backoff_delay(attempt, base=0.25)
                log.log(
                    logging.WARNING if attempt == 1 else logging.DEBUG,
                    "cannot refresh %s instances (%s); keeping last view, retry in %.1fs",
                    self.type,
                    e,
                    delay,
                )
                await asyncio.sleep(delay)

    async def start(self, initial_timeout_s: float = 5.0) -> None:
        self._task = asyncio.create_task(self._loop())
        try:
            await asyncio.wait_for(self.loaded.wait(), initial_timeout_s)
        except TimeoutError:
            log.warning("no %s instances known yet; continuing", self.type)

    async def stop(self) -> None:
        await cancel_and_wait(self._task)
        self._http.close()
