"""The public OpenAPI document: the gateway's own routes plus each routed service's part.

Each service serves its fragment (common.openapi) at ``/internal/openapi`` behind the
service credential. The gateway fetches it from one instance in the background (again
after a failure, and now and then in case a redeployed service changed), renames its
component schemas under the service's name, puts its paths under ``/<service>``, adds
what the gateway itself may answer on those paths (401 where a token is required, 429
where a rate rule applies, 502/503/504), and serves the result at ``GET /openapi.json``.
A request never waits for a service: it gets the document as last assembled.
"""

from __future__ import annotations

import asyncio
import copy
import json
import logging
from collections.abc import Callable, Sequence
from importlib.metadata import PackageNotFoundError, version
from typing import Any

import aiohttp

from common.discovery import Instance
from common.internal import SERVICE_TOKEN_HEADER
from common.openapi import ERROR_SCHEMA, FRAGMENT_PATH, Fragment, add_error
from common.tasks import cancel_and_wait
from gateway.policy import is_public, is_test_only
from gateway.settings import GatewaySettings

log = logging.getLogger("barber.gateway.openapi")

REF_PREFIX = "#/components/schemas/"
# What the gateway answers on any proxied path when instances fail, are all busy or slow.
PROXY_ERRORS = (502, 503, 504)
SECURITY_SCHEMES = {
    "bearer": {
        "type": "http",
        "scheme": "bearer",
        "bearerFormat": "JWT (EdDSA)",
        "description": "the token from POST /authen/authen/signin",
    }
}


def _package_version() -> str:
    try:
        return version("barber")
    except PackageNotFoundError:
        return "0"


def rename_refs(node: Any, rename: Callable[[str], str]) -> Any:
    """A copy of ``node`` whose component references go through ``rename``."""
    if isinstance(node, dict):
        out = {}
        for k, v in node.items():
            if k == "$ref" and isinstance(v, str) and v.startswith(REF_PREFIX):
                out[k] = REF_PREFIX + rename(v[len(REF_PREFIX) :])
            else:
                out[k] = rename_refs(v, rename)
        return out
    if isinstance(node, list):
        return [rename_refs(v, rename) for v in node]
    return node


def _prefixer(prefix: str) -> Callable[[str], str]:
    return lambda name: name if name == ERROR_SCHEMA else prefix + name


def _example_path(template: str) -> str:
    return template.replace("{", "").replace("}", "")


def assemble(settings: GatewaySettings, own: Fragment, fragments: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """The public document from the gateway's own fragment and the services' (raw JSON)."""
    paths: dict[str, Any] = {}
    components: dict[str, Any] = {}

    def add(prefix: str, part: dict[str, Any], path_prefix: str, proxied: bool) -> None:
        rename = _prefixer(prefix)
        part = rename_refs(part, rename)
        for name, schema in part.get("components", {}).get("schemas", {}).items():
            components[rename(name)] = schema
        for template, ops in part.get("paths", {}).items():
            public = path_prefix + template
            if proxied and not settings.enable_sleepy and is_test_only(public):
                continue  # the gateway does not route test aids (hence neither documents them)
            for method, op in ops.items():
                op = copy.deepcopy(op)
                op["operationId"] = prefix + op["operationId"]
                if proxied:
                    _gateway_answers(settings, method.upper(), public, op)
                if path_prefix:
                    op.setdefault("tags", [path_prefix.strip("/")])
                paths.setdefault(public, {})[method] = op

    add("gateway_", {"paths": own.paths, "components": {"schemas": own.components}}, "", proxied=False)
    for service in settings.services:
        if service in fragments:
            add(f"{service}_", fragments[service], f"/{service}", proxied=True)
    doc: dict[str, Any] = {
        "openapi": "3.1.0",
        "info": {
            "title": "Barber public API",
            "version": _package_version(),
            "description": 'Every path through the gateway. Errors are JSON `{"detail": str}`.',
        },
        "paths": dict(sorted(paths.items())),
        "components": {"schemas": dict(sorted(components.items())), "securitySchemes": SECURITY_SCHEMES},
    }
    missing = [s for s in settings.services if s not in fragments]
    if missing:
        doc["info"]["x-missing-services"] = missing
    return doc


def _gateway_answers(settings: GatewaySettings, method: str, public: str, op: dict[str, Any]) -> None:
    responses = op["responses"]
    if not is_public(method, _example_path(public)):
        op["security"] = [{"bearer": []}]
        add_error(responses, 401)
    if any(rule.matches(method, public) for rule in settings.rate_limits):
        add_error(responses, 429)
        responses["429"].setdefault(
            "headers", {"Retry-After": {"schema": {"type": "string"}, "description": "seconds to wait"}}
        )
    for status in PROXY_ERRORS:
        add_error(responses, status)
    op["responses"] = dict(sorted(responses.items()))


class SpecSource:
    """The services' fragments, fetched in the background; :attr:`document` is always ready."""

    def __init__(
        self,
        settings: GatewaySettings,
        own: Fragment,
        instances: Callable[[str], Sequence[Instance]],
        session: aiohttp.ClientSession,
        secret: str,
        *,
        refresh_s: float = 300.0,
        retry_s: float = 2.0,
    ) -> None:
        self.settings = settings
        self.own = own
        self._instances = instances
        self._session = session
        self._secret = secret
        self._refresh_s = refresh_s
        self._retry_s = retry_s
        self.fragments: dict[str, dict[str, Any]] = {}
        self.document: dict[str, Any] = assemble(settings, own, {})
        self.body = json.dumps(self.document)
        self._task: asyncio.Task[None] | None = None
        if own.undeclared:
            log.warning("gateway routes without an OpenAPI declaration: %s", ", ".join(own.undeclared))

    def start(self) -> None:
        self._task = asyncio.ensure_future(self._run())

    async def stop(self) -> None:
        await cancel_and_wait(self._task)

    async def _run(self) -> None:
        while True:
            changed = False
            for service in self.settings.services:
                fragment = await self._fetch(service)
                if fragment is not None and fragment != self.fragments.get(service):
                    self.fragments[service] = fragment
                    changed = True
            if changed:
                self.document = assemble(self.settings, self.own, self.fragments)
                self.body = json.dumps(self.document)
            complete = all(s in self.fragments for s in self.settings.services)
            await asyncio.sleep(self._refresh_s if complete else self._retry_s)

    async def _fetch(self, service: str) -> dict[str, Any] | None:
        timeout = aiohttp.ClientTimeout(total=5.0)
        for inst in self._instances(service):
            try:
                async with self._session.get(
                    inst.url + FRAGMENT_PATH, timeout=timeout, headers={SERVICE_TOKEN_HEADER: self._secret}
                ) as resp:
                    if resp.status != 200:
                        log.info("no OpenAPI fragment from %s %s: %d", service, inst.address, resp.status)
                        continue
                    fragment = json.loads(await resp.read())
            except (aiohttp.ClientError, TimeoutError, ValueError) as e:
                log.info("no OpenAPI fragment from %s %s: %s", service, inst.address, e)
                continue
            if fragment.get("undeclared"):
                log.warning("%s routes without an OpenAPI declaration: %s", service, ", ".join(fragment["undeclared"]))
            return fragment
        return None
