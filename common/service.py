"""Service bootstrap: build the app, listen, register, stop gracefully on SIGTERM.

A service's ``__main__`` is::

    settings = load_settings_or_exit(MySettings)
    run(settings, "authen", build)     # build(settings) -> ServiceApp

Graceful stop: deregister first (so callers stop choosing us), stop accepting, let
in-flight requests finish within ``SHUTDOWN_GRACE_S``, then run the service's closers.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import tornado.web
from tornado.httpserver import HTTPServer
from tornado.iostream import IOStream
from tornado.routing import PathMatches, Rule

from common import internal
from common.bodylimit import BodyLimit, refuse_connection
from common.config import ServiceSettings, parse_networks
from common.discovery import Registration
from common.handler import (
    CONTEXT,
    INFLIGHT,
    MAX_BODY,
    REVOCATIONS,
    SERVICE_SECRET,
    TRUSTED_PROXIES,
    VERIFIER,
    Inflight,
    NotFoundHandler,
    log_request,
)
from common.logs import setup_logging
from common.openapi import route_pattern, with_fragment
from common.tokens import Revocations, TokenVerifier

log = logging.getLogger("barber.service")

# Tornado's own ceiling on any body. Ours is lower and enforced first (common.bodylimit):
# a declared length over MAX_BODY_BYTES is refused unread, a chunked body is answered 413
# as soon as it passes it.
SERVER_MAX_BODY_BYTES = 16 * 1024 * 1024


class Server(HTTPServer):
    """Tornado's HTTP server with a cap on the connections it holds: past
    ``MAX_CONNECTIONS`` a new connection gets a JSON 503 at once and is closed, so a flood
    of idle or slow connections cannot pin the process while its clients are served."""

    limits: BodyLimit
    max_connections: int

    @property
    def connection_count(self) -> int:
        return len(self._connections)

    def handle_stream(self, stream: IOStream, address: tuple[Any, ...]) -> None:
        if len(self._connections) >= self.max_connections:
            refuse_connection(self.limits, stream, self.max_connections)
            return
        super().handle_stream(stream, address)


def make_server(settings: ServiceSettings, app: tornado.web.Application) -> Server:
    """The server for ``app`` with the service's limits: body size, header and body
    timeouts (slow clients are cut off), connections."""
    limited = BodyLimit(app, app.settings[MAX_BODY])
    # idle_connection_timeout is Tornado's header timeout: it bounds the wait for a whole
    # request head, so a client dribbling header lines is cut off with it.
    server = Server(
        limited,
        max_body_size=SERVER_MAX_BODY_BYTES,
        idle_connection_timeout=settings.header_timeout_s,
        body_timeout=settings.body_timeout_s,
    )
    server.limits = limited
    server.max_connections = settings.max_connections
    return server


class Listener(Protocol):
    """What :func:`serve` needs of a service's HTTP server (Tornado's :class:`Server`, or
    the gateway's front)."""

    def listen(self, port: int, address: str | None = None) -> None: ...

    def stop(self) -> None: ...

    async def close_all_connections(self) -> None: ...


@dataclass
class ServiceApp:
    app: tornado.web.Application
    on_stop: list[Callable[[], Awaitable[Any]]] = field(default_factory=list)
    # Register with discovery under this type (None: do not register).
    register_as: str | None = None
    # Called once the server stops accepting, before in-flight requests are awaited
    # (e.g. to answer long polls at once instead of holding the drain for their wait).
    on_drain: list[Callable[[], Any]] = field(default_factory=list)
    # The server to listen with, given the service's Tornado server (None: that one).
    server: Callable[[Server], Listener] | None = None


@dataclass
class Mount:
    """A component served inside another service's application (the deletion coordinator
    inside the gateway) with a context object of its own: its routes get a child
    Application that shares the host's settings (verifier, service secret, limits, the
    in-flight count a graceful stop waits for) except the context, so its handlers reach
    their dependencies as ``self.context`` like any service's."""

    routes: list[Any]
    context: Any
    on_stop: list[Callable[[], Awaitable[Any]]] = field(default_factory=list)


def _mounted(mount: Mount, app_settings: dict[str, Any]) -> Rule:
    """The rule sending the mount's paths (exactly those of its routes) to its child app."""
    patterns = []
    for rule in mount.routes:
        found = route_pattern(rule)
        if found is None:
            raise ValueError(f"a mount's routes are (pattern, handler) pairs, not {rule!r}")
        patterns.append(found[0].removesuffix("$"))
    child = tornado.web.Application(mount.routes, **{**app_settings, CONTEXT: mount.context})
    return Rule(PathMatches("(?:" + "|".join(f"(?:{p})" for p in patterns) + ")$"), child)


def make_app(
    settings: ServiceSettings, routes: list[Any], context: Any = None, mounts: Sequence[Mount] = (), **extra: Any
) -> tornado.web.Application:
    """An Application wired with the base handler's settings (verifier, secret, limits)
    and the service's context object, which handlers reach as ``self.context``;
    ``mounts`` are served before ``routes``."""
    app_settings: dict[str, Any] = {
        CONTEXT: context,
        "default_handler_class": NotFoundHandler,
        "log_function": log_request,
        "compress_response": False,
        MAX_BODY: settings.max_body_bytes,
        INFLIGHT: Inflight(),
        TRUSTED_PROXIES: parse_networks(settings.trusted_proxies),
    }
    if settings.jwt_public_key_file.exists():
        revocations = Revocations(settings.redis_url, settings.token_revocation_refresh_s)
        app_settings[REVOCATIONS] = revocations
        app_settings[VERIFIER] = TokenVerifier.from_file(settings.jwt_public_key_file, revocations)
    if settings.service_secret_file.exists():
        app_settings[SERVICE_SECRET] = internal.read_secret(settings.service_secret_file)
    app_settings.update(extra)
    served = [*(_mounted(mount, app_settings) for mount in mounts), *routes]
    described = [*(rule for mount in mounts for rule in mount.routes), *routes]
    # Every service serves its part of the OpenAPI document to the gateway (internal path).
    return tornado.web.Application(with_fragment(served, described), **app_settings)


async def serve(settings: ServiceSettings, service: ServiceApp) -> None:
    revocations: Revocations | None = service.app.settings.get(REVOCATIONS)
    if revocations is not None:
        await revocations.start()
        service.on_stop.append(revocations.stop)
    tornado_server = make_server(settings, service.app)
    server = service.server(tornado_server) if service.server is not None else tornado_server
    try:
        server.listen(settings.port, settings.host)
    except OSError as e:
        raise SystemExit(f"cannot listen on {settings.host}:{settings.port}: {e.strerror}") from e
    log.info("listening on %s:%d", settings.host, settings.port)

    registration: Registration | None = None
    if service.register_as and settings.discovery_url:
        secret = service.app.settings.get(SERVICE_SECRET, "")
        registration = Registration(
            settings.discovery_url, service.register_as, settings.advertise_host, settings.port, secret
        )
        registration.start()

    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stopping.set)
    await stopping.wait()

    log.info("stopping: deregistering and draining in-flight requests")
    if registration is not None:
        await registration.stop()
    server.stop()
    for drain in service.on_drain:
        drain()
    inflight: Inflight = service.app.settings[INFLIGHT]
    deadline = time.monotonic() + settings.shutdown_grace_s
    while inflight.count > 0 and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    if inflight.count:
        log.warning("stopping with %d requests still in flight", inflight.count)
    for closer in service.on_stop:
        try:
            await closer()
        except Exception:
            log.exception("error while closing")
    await server.close_all_connections()
    log.info("stopped")


def run(settings: ServiceSettings, name: str, build: Callable[[Any], Awaitable[ServiceApp]]) -> None:
    setup_logging(name, settings.log_level, instance=f"{settings.advertise_host}:{settings.port}")

    async def main() -> None:
        service = await build(settings)
        await serve(settings, service)

    asyncio.run(main())
