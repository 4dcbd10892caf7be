"""Discovery's HTTP handlers: thin wrappers over :mod:`discovery.registry`."""

from __future__ import annotations

from pydantic import BaseModel, Field

from common.errors import BadRequest, NotFound
from common.handler import CONTEXT, BaseHandler, decode_json_object, validate
from common.openapi import QueryFloat, QueryModel
from discovery.context import DiscoveryContext
from discovery.registry import TYPE_RE, Registry, Watchers, wait_for_change

SEED_MISSING = "Host and service type are required."


class RegisterBody(BaseModel):
    type: str = Field(pattern=TYPE_RE.pattern)
    host: str = Field(min_length=1, max_length=255, pattern=r"^[A-Za-z0-9.:\[\]_-]+$")
    port: int = Field(ge=1, le=65535)


class ListingQuery(QueryModel):
    version: str | None = Field(None, max_length=64, description="the listing's version the caller has")
    wait: QueryFloat = Field(0.0, ge=0.0, le=300.0, description="seconds to wait for a change of version")


def parse_register(raw: bytes) -> RegisterBody:
    """The seed's contract first (type and host present), then the field rules."""
    data = decode_json_object(raw or b"{}")
    if not data.get("type") or not data.get("host"):
        raise BadRequest(SEED_MISSING)
    if data.get("port") in (None, ""):
        raise BadRequest("Port is required.")
    return validate(RegisterBody, data)


class DiscoveryHandler(BaseHandler):
    @property
    def context(self) -> DiscoveryContext:
        return self.settings[CONTEXT]

    @property
    def registry(self) -> Registry:
        return self.context.registry

    @property
    def watchers(self) -> Watchers:
        return self.context.watchers


class RegisterHandler(DiscoveryHandler):
    async def post(self) -> None:
        self.require_service()
        body = parse_register(self.request.body)
        instance_id = await self.registry.register(body.type, body.host, body.port)
        self.watchers.notify(body.type)
        self.write_json(
            {
                "instance_id": instance_id,
                "ttl": self.registry.ttl_s,
                "message": f"Service registered: {body.host}:{body.port} as {body.type}",
            },
            status=201,
        )


class InstanceHandler(DiscoveryHandler):
    async def put(self, instance_id: str) -> None:
        self.require_service()
        if not await self.registry.heartbeat(instance_id):
            raise NotFound(f"no registration {instance_id} (expired or removed); register again")
        self.write_json({"instance_id": instance_id, "ttl": self.registry.ttl_s})

    async def delete(self, instance_id: str) -> None:
        self.require_service()
        type_ = await self.registry.deregister(instance_id)
        if type_ is not None:
            self.watchers.notify(type_)
        self.write_json({"instance_id": instance_id, "deregistered": type_ is not None})


class ServicesHandler(DiscoveryHandler):
    async def get(self, type_: str) -> None:
        if not TYPE_RE.fullmatch(type_):
            raise BadRequest("type: must be lower-case letters, digits, '-' or '_'")
        q = self.parse_query(ListingQuery)
        if q.wait > self.context.settings.max_wait_s:
            raise BadRequest(f"wait: must be at most {self.context.settings.max_wait_s:g}")
        listing = await wait_for_change(self.registry, self.watchers, type_, q.version or None, q.wait)
        self.write_json(listing.as_dict())


class AllServicesHandler(DiscoveryHandler):
    async def get(self) -> None:
        out = {}
        for type_ in await self.registry.types():
            out[type_] = (await self.registry.list(type_)).as_dict()
        self.write_json({"services": out})


class StatusHandler(DiscoveryHandler):
    async def get(self) -> None:
        redis_ok = await self.registry.ping()
        types: dict[str, int] = {}
        if redis_ok:
            for type_ in await self.registry.types():
                types[type_] = len((await self.registry.list(type_)).instances)
        self.write_json(
            {
                "status": "ok" if redis_ok else "degraded",
                "service": "discovery",
                "instance": f"{self.context.settings.advertise_host}:{self.context.settings.port}",
                "redis": "ok" if redis_ok else "unavailable",
                "instance_ttl_s": self.registry.ttl_s,
                "services": types,
                "watching": dict(self.watchers.waiting),
                "watch_events": self.watchers.size,
            }
        )


def routes() -> list[tuple[str, type[DiscoveryHandler]]]:
    return [
        (r"/register", RegisterHandler),
        (r"/register/([A-Za-z0-9_.-]{1,100})", InstanceHandler),
        (r"/services", AllServicesHandler),
        (r"/services/([^/]+)", ServicesHandler),
        (r"/status", StatusHandler),
    ]
