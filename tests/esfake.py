"""A small Elasticsearch and Kibana for tests: real HTTP servers on real ports.

Elasticsearch and Kibana cannot run on this machine, so this answers the part of their
REST APIs that Barber uses, shaped as the reference documentation gives them (status
codes, bodies, the ``X-Elastic-Product`` header the official client insists on), keeps
what it is sent (templates, policies, pipelines, documents by index and id, saved
objects) and records every request. Faults on demand: ``fail(...)`` answers the next
matching requests with an error status (optionally after applying them, as when a
response is lost), ``reject_items(...)`` refuses chosen bulk items with 429.
"""

from __future__ import annotations

import asyncio
import copy
import email.parser
import email.policy
import json
import re
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest
from aiohttp import web

from elk.templates import get_field

ES_HEADERS = {"X-Elastic-Product": "Elasticsearch"}
ES_JSON = "application/vnd.elasticsearch+json; compatible-with=9"


@dataclass
class Recorded:
    method: str
    path: str
    query: dict[str, str]
    headers: dict[str, str]
    body: bytes
    at: float  # time.monotonic() when it arrived
    status: int = 0

    def json(self) -> Any:
        return json.loads(self.body)

    def ndjson(self) -> list[Any]:
        return [json.loads(line) for line in self.body.decode().splitlines() if line.strip()]


@dataclass
class _Fault:
    method: str
    path: re.Pattern[str]
    status: int
    times: int
    apply: bool  # do the work, then answer the error (a lost response)


@dataclass
class State:
    ilm: dict[str, dict[str, Any]] = field(default_factory=dict)
    pipelines: dict[str, dict[str, Any]] = field(default_factory=dict)
    component_templates: dict[str, dict[str, Any]] = field(default_factory=dict)
    index_templates: dict[str, dict[str, Any]] = field(default_factory=dict)
    # index -> _id -> {"_source": ..., "_version": n}
    indices: dict[str, dict[str, dict[str, Any]]] = field(default_factory=dict)
    saved_objects: dict[tuple[str, str], dict[str, Any]] = field(default_factory=dict)
    ilm_versions: dict[str, int] = field(default_factory=dict)


def _error(status: int, type_: str, reason: str) -> web.Response:
    body = {
        "error": {"root_cause": [{"type": type_, "reason": reason}], "type": type_, "reason": reason},
        "status": status,
    }
    return _json(body, status)


def _json(body: Any, status: int = 200) -> web.Response:
    return web.Response(status=status, body=json.dumps(body).encode(), headers={**ES_HEADERS, "Content-Type": ES_JSON})


def _ack() -> web.Response:
    return _json({"acknowledged": True})


class FakeElastic:
    """``es_url`` speaks Elasticsearch, ``kibana_url`` speaks Kibana; both share :attr:`state`."""

    def __init__(self) -> None:
        self.state = State()
        self.requests: list[Recorded] = []
        self._faults: list[_Fault] = []
        self._rejects: dict[str, int] = {}
        self._lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._runners: list[web.AppRunner] = []
        self.es_url = ""
        self.kibana_url = ""
        self.kibana_available = True

    # -- control ------------------------------------------------------------------------
    def fail(self, method: str, path: str, status: int, times: int = 1, *, apply: bool = False) -> None:
        """Answer the next ``times`` requests ``method`` ``path`` (both regexes) with ``status``."""
        with self._lock:
            self._faults.append(_Fault(method, re.compile(path), status, times, apply))

    def reject_items(self, ids: list[str], times: int = 1) -> None:
        """Refuse these bulk items (by _id) with 429 the next ``times`` times they come."""
        with self._lock:
            for i in ids:
                self._rejects[i] = times

    def clear(self) -> None:
        with self._lock:
            self.requests.clear()
            self._faults.clear()
            self._rejects.clear()

    def docs(self, index: str) -> dict[str, dict[str, Any]]:
        with self._lock:
            return copy.deepcopy(self.state.indices.get(index, {}))

    def writes(self) -> list[Recorded]:
        """Requests that change something (everything but GET/HEAD)."""
        with self._lock:
            return [r for r in self.requests if r.method not in ("GET", "HEAD")]

    def matching(self, method: str, path: str) -> list[Recorded]:
        """Recorded requests whose method and path match these regexes, oldest first."""
        pattern = re.compile(path)
        with self._lock:
            return [r for r in self.requests if re.fullmatch(method, r.method) and pattern.fullmatch(r.path)]

    # -- lifecycle ----------------------------------------------------------------------
    def start(self) -> FakeElastic:
        ready = threading.Event()

        def run() -> None:
            loop = asyncio.new_event_loop()
            self._loop = loop
            asyncio.set_event_loop(loop)
            loop.run_until_complete(self._start_servers())
            ready.set()
            loop.run_forever()
            loop.run_until_complete(asyncio.gather(*(r.cleanup() for r in self._runners)))
            loop.close()

        self._thread = threading.Thread(target=run, name="esfake", daemon=True)
        self._thread.start()
        if not ready.wait(30):
            raise RuntimeError("the fake Elasticsearch did not start")
        return self

    def stop(self) -> None:
        loop, thread = self._loop, self._thread
        self._loop = self._thread = None
        if loop is not None and thread is not None:
            loop.call_soon_threadsafe(loop.stop)
            thread.join(30)

    async def _start_servers(self) -> None:
        for app, attr in ((self._es_app(), "es_url"), (self._kibana_app(), "kibana_url")):
            runner = web.AppRunner(app, access_log=None)
            await runner.setup()
            site = web.TCPSite(runner, "127.0.0.1", 0)
            await site.start()
            port = runner.addresses[0][1]
            setattr(self, attr, f"http://127.0.0.1:{port}")
            self._runners.append(runner)

    # -- plumbing -------------------------------------------------------------------------
    @web.middleware
    async def _record(self, request: web.Request, handler: Any) -> web.StreamResponse:
        body = await request.read()
        rec = Recorded(request.method, request.path, dict(request.query), dict(request.headers), body, time.monotonic())
        with self._lock:
            self.requests.append(rec)
            fault = next(
                (
                    f
                    for f in self._faults
                    if f.times > 0 and re.fullmatch(f.method, request.method) and f.path.fullmatch(request.path)
                ),
                None,
            )
            if fault is not None:
                fault.times -= 1
        if fault is not None and not fault.apply:
            resp: web.StreamResponse = _error(
                fault.status,
                "es_rejected_execution_exception" if fault.status == 429 else "unavailable_shards_exception",
                "injected fault",
            )
        else:
            resp = await handler(request)
            if fault is not None:
                resp = _error(fault.status, "unavailable_shards_exception", "injected fault after applying")
        rec.status = resp.status
        return resp

    # -- Elasticsearch ------------------------------------------------------------------
    def _es_app(self) -> web.Application:
        app = web.Application(middlewares=[self._record], client_max_size=64 * 1024 * 1024)
        r = app.router
        r.add_get("/", self._info)
        r.add_get("/_cluster/health", self._health)
        r.add_route("*", "/_ilm/policy/{name}", self._ilm)
        r.add_route("*", "/_ingest/pipeline/{name}", self._pipeline)
        r.add_route("*", "/_component_template/{name}", self._component)
        r.add_route("*", "/_index_template/{name}", self._index_template)
        r.add_route("*", "/_bulk", self._bulk)
        r.add_route("*", "/{index}/_bulk", self._bulk)
        r.add_post("/{index}/_delete_by_query", self._delete_by_query)
        r.add_post("/{index}/_refresh", self._refresh)
        return app

    async def _info(self, _: web.Request) -> web.Response:
        return _json(
            {
                "name": "esfake",
                "cluster_name": "barber-test",
                "cluster_uuid": "esfake-0",
                "version": {
                    "number": "9.1.0",
                    "build_flavor": "default",
                    "lucene_version": "10.2.2",
                    "minimum_wire_compatibility_version": "8.19.0",
                    "minimum_index_compatibility_version": "8.0.0",
                },
                "tagline": "You Know, for Search",
            }
        )

    async def _health(self, _: web.Request) -> web.Response:
        return _json(
            {
                "cluster_name": "barber-test",
                "status": "green",
                "timed_out": False,
                "number_of_nodes": 1,
                "number_of_data_nodes": 1,
                "active_primary_shards": 0,
                "active_shards": 0,
                "relocating_shards": 0,
                "initializing_shards": 0,
                "unassigned_shards": 0,
            }
        )

    def _crud(
        self, store: dict[str, Any], request: web.Request, body: bytes, found: Any, missing: web.Response, put: Any
    ) -> web.Response:
        name = request.match_info["name"]
        if request.method == "GET":
            if name not in store:
                return missing
            return _json(found(name, store[name]))
        if request.method == "PUT":
            with self._lock:
                put(name, json.loads(body))
            return _ack()
        if request.method == "DELETE":
            with self._lock:
                if store.pop(name, None) is None:
                    return missing
            return _ack()
        return _error(405, "illegal_argument_exception", f"{request.method} not allowed")

    async def _ilm(self, request: web.Request) -> web.Response:
        s = self.state
        name = request.match_info["name"]

        def put(n: str, body: dict[str, Any]) -> None:
            s.ilm[n] = body["policy"]
            s.ilm_versions[n] = s.ilm_versions.get(n, 0) + 1

        return self._crud(
            s.ilm,
            request,
            await request.read(),
            lambda n, p: {
                n: {
                    "version": s.ilm_versions[n],
                    "modified_date": "2026-01-01T00:00:00.000Z",
                    "policy": p,
                    "in_use_by": {"indices": [], "data_streams": [], "composable_templates": []},
                }
            },
            _error(404, "resource_not_found_exception", f"Lifecycle policy not found: {name}"),
            put,
        )

    async def _pipeline(self, request: web.Request) -> web.Response:
        s = self.state
        return self._crud(
            s.pipelines,
            request,
            await request.read(),
            lambda n, p: {n: p},
            _json({}, 404),
            lambda n, b: s.pipelines.__setitem__(n, b),
        )

    async def _component(self, request: web.Request) -> web.Response:
        s = self.state
        name = request.match_info["name"]
        return self._crud(
            s.component_templates,
            request,
            await request.read(),
            lambda n, b: {"component_templates": [{"name": n, "component_template": b}]},
            _error(404, "resource_not_found_exception", f"component template matching [{name}] not found"),
            lambda n, b: s.component_templates.__setitem__(n, b),
        )

    async def _index_template(self, request: web.Request) -> web.Response:
        s = self.state
        name = request.match_info["name"]

        def put(n: str, b: dict[str, Any]) -> None:
            missing = [c for c in b.get("composed_of", []) if c not in s.component_templates]
            if missing:
                raise web.HTTPBadRequest(
                    text=json.dumps(
                        {
                            "error": {"type": "invalid_index_template_exception", "reason": f"missing {missing}"},
                            "status": 400,
                        }
                    ),
                    headers={**ES_HEADERS, "Content-Type": ES_JSON},
                )
            s.index_templates[n] = b

        return self._crud(
            s.index_templates,
            request,
            await request.read(),
            lambda n, b: {"index_templates": [{"name": n, "index_template": b}]},
            _error(404, "resource_not_found_exception", f"index template matching [{name}] not found"),
            put,
        )

    async def _bulk(self, request: web.Request) -> web.Response:
        if request.method not in ("POST", "PUT"):
            return _error(405, "illegal_argument_exception", "bulk takes POST or PUT")
        lines = [json.loads(line) for line in (await request.read()).decode().splitlines() if line.strip()]
        default_index = request.match_info.get("index")
        items: list[dict[str, Any]] = []
        i = 0
        with self._lock:
            while i < len(lines):
                ((op, meta),) = lines[i].items()
                i += 1
                index = meta.get("_index", default_index)
                _id = meta.get("_id")
                source = None
                if op in ("index", "create", "update"):
                    source = lines[i]
                    i += 1
                if self._rejects.get(_id, 0) > 0:
                    self._rejects[_id] -= 1
                    items.append(
                        {
                            op: {
                                "_index": index,
                                "_id": _id,
                                "status": 429,
                                "error": {
                                    "type": "es_rejected_execution_exception",
                                    "reason": "rejected execution of coordinating operation",
                                },
                            }
                        }
                    )
                    continue
                docs = self.state.indices.setdefault(index, {})
                if op == "delete":
                    existed = docs.pop(_id, None) is not None
                    items.append(
                        {
                            op: {
                                "_index": index,
                                "_id": _id,
                                "result": "deleted" if existed else "not_found",
                                "status": 200 if existed else 404,
                            }
                        }
                    )
                    continue
                if op == "create" and _id in docs:
                    items.append(
                        {
                            op: {
                                "_index": index,
                                "_id": _id,
                                "status": 409,
                                "error": {
                                    "type": "version_conflict_engine_exception",
                                    "reason": "document already exists",
                                },
                            }
                        }
                    )
                    continue
                if _id is None:
                    _id = f"auto-{sum(len(d) for d in self.state.indices.values())}"
                version = docs.get(_id, {}).get("_version", 0) + 1
                docs[_id] = {"_source": source, "_version": version}
                items.append(
                    {
                        op: {
                            "_index": index,
                            "_id": _id,
                            "_version": version,
                            "result": "created" if version == 1 else "updated",
                            "status": 201 if version == 1 else 200,
                            "_shards": {"total": 1, "successful": 1, "failed": 0},
                            "_seq_no": version - 1,
                            "_primary_term": 1,
                        }
                    }
                )
        errors = any(next(iter(it.values())).get("error") for it in items)
        return _json({"took": 1, "errors": errors, "items": items})

    async def _refresh(self, _: web.Request) -> web.Response:
        return _json({"_shards": {"total": 1, "successful": 1, "failed": 0}})

    async def _delete_by_query(self, request: web.Request) -> web.Response:
        index = request.match_info["index"]
        body = json.loads(await request.read() or b"{}")
        with self._lock:
            if index not in self.state.indices:
                if request.query.get("ignore_unavailable") == "true":
                    return _json(self._dbq_result(0))
                return _error(404, "index_not_found_exception", f"no such index [{index}]")
            query = body.get("query", {})
            docs = self.state.indices[index]
            if set(query) == {"terms"} and len(query["terms"]) == 1:
                ((fname, values),) = query["terms"].items()
                gone = [i for i, d in docs.items() if get_field(d["_source"], fname) in values]
            elif set(query) == {"range"} and len(query["range"]) == 1:
                ((fname, bounds),) = query["range"].items()
                tests = {
                    "lt": lambda v, b: v < b,
                    "lte": lambda v, b: v <= b,
                    "gt": lambda v, b: v > b,
                    "gte": lambda v, b: v >= b,
                }
                gone = [
                    i
                    for i, d in docs.items()
                    if (v := get_field(d["_source"], fname)) is not None
                    and all(tests[op](v, b) for op, b in bounds.items())
                ]
            else:
                return _error(400, "parsing_exception", "esfake answers a single terms or range query only")
            for i in gone:
                del docs[i]
        return _json(self._dbq_result(len(gone)))

    @staticmethod
    def _dbq_result(deleted: int) -> dict[str, Any]:
        return {
            "took": 1,
            "timed_out": False,
            "total": deleted,
            "deleted": deleted,
            "batches": 1,
            "version_conflicts": 0,
            "noops": 0,
            "retries": {"bulk": 0, "search": 0},
            "throttled_millis": 0,
            "requests_per_second": -1.0,
            "throttled_until_millis": 0,
            "failures": [],
        }

    # -- Kibana -------------------------------------------------------------------------
    def _kibana_app(self) -> web.Application:
        app = web.Application(middlewares=[self._record, self._xsrf], client_max_size=64 * 1024 * 1024)
        app.router.add_get("/api/status", self._kb_status)
        for prefix in ("", "/s/{space}"):
            app.router.add_post(prefix + "/api/saved_objects/_bulk_get", self._kb_bulk_get)
            app.router.add_post(prefix + "/api/saved_objects/_import", self._kb_import)
        return app

    @web.middleware
    async def _xsrf(self, request: web.Request, handler: Any) -> web.StreamResponse:
        if request.method != "GET" and "kbn-xsrf" not in request.headers:
            return web.json_response(
                {"statusCode": 400, "error": "Bad Request", "message": "Request must contain a kbn-xsrf header."},
                status=400,
            )
        return await handler(request)

    async def _kb_status(self, _: web.Request) -> web.Response:
        level = "available" if self.kibana_available else "unavailable"
        return web.json_response(
            {"name": "kbfake", "version": {"number": "9.1.0"}, "status": {"overall": {"level": level}}},
            status=200 if self.kibana_available else 503,
        )

    async def _kb_bulk_get(self, request: web.Request) -> web.Response:
        wanted = await request.json()
        out = []
        with self._lock:
            for w in wanted:
                obj = self.state.saved_objects.get((w["type"], w["id"]))
                out.append(
                    copy.deepcopy(obj)
                    if obj is not None
                    else {
                        "id": w["id"],
                        "type": w["type"],
                        "error": {
                            "statusCode": 404,
                            "error": "Not Found",
                            "message": f"Saved object [{w['type']}/{w['id']}] not found",
                        },
                    }
                )
        return web.json_response({"saved_objects": out})

    async def _kb_import(self, request: web.Request) -> web.Response:
        # The body was read (and recorded) already: parse the multipart form from it.
        head = f"Content-Type: {request.headers.get('Content-Type', '')}\r\n\r\n".encode()
        form = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(head + await request.read())
        files = (
            [p for p in form.iter_parts() if p.get_param("name", header="content-disposition") == "file"]
            if form.is_multipart()
            else []
        )
        if not files:
            return web.json_response(
                {"statusCode": 400, "error": "Bad Request", "message": "file is required"}, status=400
            )
        text = files[0].get_payload(decode=True).decode()
        objects = [json.loads(line) for line in text.splitlines() if line.strip()]
        overwrite = request.query.get("overwrite") == "true"
        with self._lock:
            known = set(self.state.saved_objects) | {(o["type"], o["id"]) for o in objects}
            errors = []
            for o in objects:
                missing = [r for r in o.get("references", []) if (r["type"], r["id"]) not in known]
                if missing:
                    errors.append(
                        {
                            "id": o["id"],
                            "type": o["type"],
                            "title": o["attributes"].get("title"),
                            "error": {
                                "type": "missing_references",
                                "references": [{"type": r["type"], "id": r["id"]} for r in missing],
                            },
                        }
                    )
                elif (o["type"], o["id"]) in self.state.saved_objects and not overwrite:
                    errors.append(
                        {
                            "id": o["id"],
                            "type": o["type"],
                            "title": o["attributes"].get("title"),
                            "error": {"type": "conflict"},
                        }
                    )
            if errors:
                return web.json_response({"success": False, "successCount": 0, "errors": errors})
            for o in objects:
                self.state.saved_objects[(o["type"], o["id"])] = {
                    "id": o["id"],
                    "type": o["type"],
                    "attributes": o["attributes"],
                    "references": o.get("references", []),
                    "version": "WzEsMV0=",
                    "namespaces": ["default"],
                }
        return web.json_response(
            {
                "success": True,
                "successCount": len(objects),
                "successResults": [
                    {"type": o["type"], "id": o["id"], "meta": {"title": o["attributes"].get("title")}} for o in objects
                ],
            }
        )


@pytest.fixture
def fake() -> Iterator[FakeElastic]:
    """A fresh Elasticsearch and Kibana for one test (import this fixture into a test module)."""
    server = FakeElastic().start()
    try:
        yield server
    finally:
        server.stop()
