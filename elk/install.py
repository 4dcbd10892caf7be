"""`python -m elk setup`: install the templates, ILM policy, pipeline and Kibana objects.

Idempotent by content: each object we PUT carries ``_meta.barber_hash``, a hash of its own
body, and is written only when the installed copy is missing or carries another hash.
Comparing our hash rather than the stored body keeps the check exact even though
Elasticsearch normalises what it stores (adds defaults, turns numbers into strings).
Kibana saved objects have no such slot; they are compared attribute by attribute.
"""

from __future__ import annotations

import asyncio
import hashlib
import io
import json
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
from elasticsearch import ApiError, AsyncElasticsearch, NotFoundError, TransportError
from elasticsearch import ConnectionError as ESConnectionError

from elk import templates as t
from elk.settings import ElkSettings

log = logging.getLogger("barber.elk")

SAVED_OBJECTS = Path(__file__).resolve().parent / "kibana" / "barber.ndjson"
HASH_KEY = "barber_hash"


class SetupError(Exception):
    """Elasticsearch or Kibana refused or never answered; the message says which."""


@dataclass
class Report:
    items: list[tuple[str, str, str]] = field(default_factory=list)  # (kind, name, outcome)

    def add(self, kind: str, name: str, outcome: str) -> None:
        self.items.append((kind, name, outcome))

    def count(self, outcome: str) -> int:
        return sum(1 for _, _, o in self.items if o == outcome)

    @property
    def changed(self) -> bool:
        return any(o != "unchanged" for _, _, o in self.items)

    def text(self) -> str:
        lines = [f"{outcome:9}  {kind:20} {name}" for kind, name, outcome in self.items]
        lines.append(
            f"{self.count('created')} created, {self.count('updated')} updated, {self.count('unchanged')} unchanged"
        )
        return "\n".join(lines)


def with_hash(body: dict[str, Any]) -> dict[str, Any]:
    """``body`` with ``_meta.barber_hash`` set to a hash of everything else in it."""
    meta = {k: v for k, v in body.get("_meta", {}).items() if k != HASH_KEY}
    plain = {**body, "_meta": meta}
    digest = hashlib.sha256(json.dumps(plain, sort_keys=True, separators=(",", ":")).encode()).hexdigest()[:16]
    return {**body, "_meta": {**meta, "managed_by": "barber-elk", HASH_KEY: digest}}


def _hash_of(meta: Any) -> str | None:
    return meta.get(HASH_KEY) if isinstance(meta, dict) else None


# -- Elasticsearch ------------------------------------------------------------------
@dataclass(frozen=True)
class Kind:
    """How to read the installed hash of one kind of object, and how to write it."""

    label: str
    get: Callable[[AsyncElasticsearch, str], Awaitable[str | None]]
    put: Callable[[AsyncElasticsearch, str, dict[str, Any]], Awaitable[Any]]


async def _ilm_hash(es: AsyncElasticsearch, name: str) -> str | None:
    resp = await es.ilm.get_lifecycle(name=name)
    return _hash_of(resp[name]["policy"].get("_meta"))


async def _pipeline_hash(es: AsyncElasticsearch, name: str) -> str | None:
    resp = await es.ingest.get_pipeline(id=name)
    return _hash_of(resp[name].get("_meta"))


async def _component_hash(es: AsyncElasticsearch, name: str) -> str | None:
    resp = await es.cluster.get_component_template(name=name)
    return _hash_of(resp["component_templates"][0]["component_template"].get("_meta"))


async def _index_template_hash(es: AsyncElasticsearch, name: str) -> str | None:
    resp = await es.indices.get_index_template(name=name)
    return _hash_of(resp["index_templates"][0]["index_template"].get("_meta"))


ILM = Kind("ilm policy", _ilm_hash, lambda es, name, body: es.ilm.put_lifecycle(name=name, policy=body))
PIPELINE = Kind("ingest pipeline", _pipeline_hash, lambda es, name, body: es.ingest.put_pipeline(id=name, body=body))
COMPONENT = Kind(
    "component template",
    _component_hash,
    lambda es, name, body: es.cluster.put_component_template(name=name, body=body),
)
INDEX_TEMPLATE = Kind(
    "index template", _index_template_hash, lambda es, name, body: es.indices.put_index_template(name=name, body=body)
)


def desired_objects(settings: ElkSettings) -> list[tuple[Kind, str, dict[str, Any]]]:
    """What setup installs, in dependency order (a template names the policy and the
    pipeline; an index template names its component templates)."""
    objs: list[tuple[Kind, str, dict[str, Any]]] = [
        (
            ILM,
            t.LOGS_ILM_POLICY,
            t.ilm_policy(
                settings.elk_log_retention_days, settings.elk_rollover_max_size, settings.elk_rollover_max_age
            ),
        ),
        (PIPELINE, t.LOGS_PIPELINE, t.logs_pipeline()),
    ]
    objs += [(COMPONENT, name, body) for name, body in t.component_templates(settings.elk_replicas).items()]
    objs += [(INDEX_TEMPLATE, name, body) for name, body in t.index_templates().items()]
    return [(kind, name, with_hash(body)) for kind, name, body in objs]


async def ensure(es: AsyncElasticsearch, kind: Kind, name: str, body: dict[str, Any], report: Report) -> None:
    try:
        installed = await kind.get(es, name)
        exists = True
    except NotFoundError:
        installed, exists = None, False
    if installed == body["_meta"][HASH_KEY]:
        report.add(kind.label, name, "unchanged")
        return
    await kind.put(es, name, body)
    report.add(kind.label, name, "updated" if exists else "created")


async def wait_for_cluster(es: AsyncElasticsearch, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            health = await es.options(request_timeout=10).cluster.health(wait_for_status="yellow", timeout="5s")
            if health.get("status") in ("yellow", "green"):
                return
            reason = f"status {health.get('status')}"
        except (ApiError, ESConnectionError, TransportError) as e:
            reason = str(e)
        if time.monotonic() >= deadline:
            raise SetupError(f"Elasticsearch not ready after {timeout_s:.0f}s: {reason}")
        log.info("waiting for Elasticsearch (%s)", reason)
        await asyncio.sleep(min(2.0, max(0.0, deadline - time.monotonic())))


# -- Kibana ---------------------------------------------------------------------------
def load_saved_objects(path: Path = SAVED_OBJECTS) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _same(installed: dict[str, Any], wanted: dict[str, Any]) -> bool:
    """Kibana adds attributes of its own on migration; only the ones we set must match."""
    attrs = installed.get("attributes") or {}
    if any(attrs.get(k) != v for k, v in wanted["attributes"].items()):
        return False
    key = lambda r: (r["type"], r["id"], r["name"])  # noqa: E731
    return sorted(installed.get("references") or [], key=key) == sorted(wanted.get("references") or [], key=key)


class Kibana:
    def __init__(self, session: aiohttp.ClientSession, url: str, space: str = "") -> None:
        self.session = session
        self.base = url.rstrip("/") + (f"/s/{space}" if space else "")
        self.root = url.rstrip("/")

    async def wait(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                async with self.session.get(f"{self.root}/api/status") as resp:
                    body = await resp.json(content_type=None) if resp.status == 200 else {}
                    level = ((body.get("status") or {}).get("overall") or {}).get("level")
                    if level == "available":
                        return
                    reason = f"HTTP {resp.status}, level {level}"
            except (TimeoutError, aiohttp.ClientError, ValueError) as e:
                reason = str(e) or type(e).__name__
            if time.monotonic() >= deadline:
                raise SetupError(f"Kibana not ready after {timeout_s:.0f}s: {reason}")
            log.info("waiting for Kibana (%s)", reason)
            await asyncio.sleep(min(2.0, max(0.0, deadline - time.monotonic())))

    async def bulk_get(self, objects: list[dict[str, Any]]) -> dict[tuple[str, str], dict[str, Any]]:
        wanted = [{"type": o["type"], "id": o["id"]} for o in objects]
        async with self.session.post(f"{self.base}/api/saved_objects/_bulk_get", json=wanted) as resp:
            if resp.status != 200:
                raise SetupError(f"Kibana _bulk_get answered {resp.status}: {await resp.text()}")
            body = await resp.json()
        return {(o["type"], o["id"]): o for o in body["saved_objects"] if "error" not in o}

    async def import_objects(self, objects: list[dict[str, Any]]) -> None:
        data = aiohttp.FormData()
        ndjson = "".join(json.dumps(o, sort_keys=True) + "\n" for o in objects)
        data.add_field("file", io.BytesIO(ndjson.encode()), filename="barber.ndjson", content_type="application/ndjson")
        async with self.session.post(
            f"{self.base}/api/saved_objects/_import", params={"overwrite": "true"}, data=data
        ) as resp:
            body = await resp.json(content_type=None) if resp.content_type.endswith("json") else {}
            if resp.status != 200 or not body.get("success"):
                raise SetupError(f"Kibana import answered {resp.status}: {body.get('errors') or body}")


async def install_kibana(kibana: Kibana, objects: list[dict[str, Any]], report: Report) -> None:
    installed = await kibana.bulk_get(objects)
    changed = []
    for obj in objects:
        current = installed.get((obj["type"], obj["id"]))
        title = obj["attributes"].get("title", obj["id"])
        if current is not None and _same(current, obj):
            report.add(f"kibana {obj['type']}", title, "unchanged")
        else:
            changed.append(obj)
            report.add(f"kibana {obj['type']}", title, "updated" if current is not None else "created")
    if changed:
        await kibana.import_objects(changed)


# -- the command ----------------------------------------------------------------------
async def setup(settings: ElkSettings, *, saved_objects: Path = SAVED_OBJECTS) -> Report:
    report = Report()
    es = AsyncElasticsearch(settings.elasticsearch_url, **settings.client_kwargs())
    try:
        await wait_for_cluster(es, settings.elk_wait_s)
        for kind, name, body in desired_objects(settings):
            await ensure(es, kind, name, body, report)
    except (ApiError, ESConnectionError, TransportError) as e:
        raise SetupError(f"Elasticsearch: {e}") from e
    finally:
        await es.close()
    if settings.kibana_url:
        headers = {"kbn-xsrf": "true", **settings.kibana_headers()}
        timeout = aiohttp.ClientTimeout(total=60)
        async with aiohttp.ClientSession(headers=headers, timeout=timeout) as session:
            kibana = Kibana(session, settings.kibana_url, settings.kibana_space)
            try:
                await kibana.wait(settings.elk_wait_s)
                await install_kibana(kibana, load_saved_objects(saved_objects), report)
            except aiohttp.ClientError as e:
                raise SetupError(f"Kibana: {e}") from e
    return report
