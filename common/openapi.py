"""OpenAPI 3.1 from the code: handlers declare what they take and answer, this builds the document.

A handler method carries its declaration::

    @api(summary="Older messages of a chat", query=HistoryQuery, responses={200: HistoryPage},
         errors=(403, 404), auth=True)
    async def get(self) -> None:
        q = self.parse_query(HistoryQuery)

so the model that validates the request (``parse_query`` / ``parse_body``) is the one the
document shows; no copy can drift. :func:`fragment` walks a service's routes and returns
its paths and component schemas; each service serves that at ``/internal/openapi``
(service credential) and the gateway assembles the public document from the fragments.
Routes under ``/internal`` are never in it; a public handler method without a
declaration is reported in ``undeclared`` (a test keeps that list empty).
"""

from __future__ import annotations

import inspect
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Annotated, Any, TypeVar

import tornado.web
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, TypeAdapter
from pydantic_core import PydanticCustomError

OPENAPI_ATTR = "__barber_openapi__"
FRAGMENT_PATH = "/internal/openapi"
TEXT_PLAIN = "text/plain"
ERROR_SCHEMA = "Error"

F = TypeVar("F", bound=Callable[..., Any])

STATUS_TEXT = {
    200: "OK",
    201: "Created",
    202: "Accepted",
    101: "Switching Protocols",
    400: "Bad request: the detail names the field",
    401: "Not authenticated (no or invalid bearer token)",
    403: "Forbidden",
    404: "Not found",
    405: "Method not allowed",
    409: "Conflict",
    413: "Request body too large",
    429: "Too many requests (see Retry-After)",
    502: "Bad gateway",
    503: "Service or dependency unavailable",
    504: "Gateway timeout",
}


class ErrorBody(BaseModel):
    """Every error answer: ``{"detail": "..."}``."""

    detail: str


class OpenModel(BaseModel):
    """A response whose listed fields are always there and which may carry more."""

    model_config = ConfigDict(extra="allow")


class StatusBody(OpenModel):
    status: str
    service: str
    instance: str


def _plain(pattern: str, convert: Callable[[str], Any], what: str) -> BeforeValidator:
    """A query string's number in plain decimal notation only: pydantic's lax parsing would
    also take "1_0", " 1" or "1e3" (and "nan" for a float)."""
    rx = re.compile(pattern)

    def parse(value: Any) -> Any:
        if isinstance(value, str):
            if not rx.fullmatch(value):
                raise PydanticCustomError("plain_number", f"must be {what}")
            return convert(value)
        return value

    return BeforeValidator(parse)


_INT = _plain(r"-?[0-9]{1,40}", int, "an integer")
_FLOAT = _plain(r"-?[0-9]{1,40}(\.[0-9]{1,40})?", float, "a decimal number")

# Number query parameters: bound them with Field(ge=..., le=...) where they are declared.
QueryInt = Annotated[int, _INT]
QueryFloat = Annotated[float, _FLOAT]


def bounded_int(ge: int, le: int) -> Any:
    """QueryInt with its bounds in the type, for ``bounded_int(1, 9) | None`` fields (the
    bounds must come before the parser for the spec to show them)."""
    return Annotated[int, Field(ge=ge, le=le), _INT]


def _absent_not_null(schema: dict[str, Any]) -> None:
    schema.pop("default", None)
    branches = schema.get("anyOf")
    if branches:
        kept = [b for b in branches if b.get("type") != "null"]
        if len(kept) == 1:
            del schema["anyOf"]
            schema.update(kept[0])


def optional_param(description: str | None = None, *, alias: str | None = None) -> Any:
    """A field that may be absent: None in the model, neither ``null`` nor a default in the
    spec (an integer's bounds go in its type: ``bounded_int(1, 9) | None``). ``alias``: the
    parameter's name when it is no Python name (``from``)."""
    return Field(None, json_schema_extra=_absent_not_null, description=description, alias=alias)


class QueryModel(BaseModel):
    """Base of query-parameter models: unknown parameters are ignored, as HTTP clients expect."""

    model_config = ConfigDict(extra="ignore", frozen=True)


@dataclass(frozen=True)
class Operation:
    summary: str
    query: type[BaseModel] | None = None
    body: type[BaseModel] | None = None
    # The path's groups as a model (BaseHandler.parse_path), when a string is not enough.
    path: type[BaseModel] | None = None
    # status -> a model or type (JSON), TEXT_PLAIN, or None (no body)
    responses: Mapping[int, Any] = field(default_factory=lambda: {200: None})
    errors: tuple[int, ...] = ()
    auth: bool = False
    # Names of the path's groups, in order (default: the method's parameter names).
    path_names: tuple[str, ...] | None = None
    headers: Mapping[int, Mapping[str, str]] = field(default_factory=dict)  # status -> header -> description
    description: str | None = None
    extensions: Mapping[str, Any] = field(default_factory=dict)


def api(summary: str, **kwargs: Any) -> Callable[[F], F]:
    """Declare a handler method's operation (see :class:`Operation`)."""
    op = Operation(summary, **kwargs)

    def mark(fn: F) -> F:
        setattr(fn, OPENAPI_ATTR, op)
        return fn

    return mark


def declared(handler: type, method: str) -> Operation | None:
    return getattr(getattr(handler, method.lower(), None), OPENAPI_ATTR, None)


def implemented_methods(handler: type[tornado.web.RequestHandler]) -> list[str]:
    """HTTP methods ``handler`` answers (those it overrides from RequestHandler)."""
    out = []
    for m in handler.SUPPORTED_METHODS:
        fn = getattr(handler, m.lower(), None)
        if fn is not None and fn is not getattr(tornado.web.RequestHandler, m.lower(), None):
            out.append(m)
    return out


# -- route patterns ------------------------------------------------------------------------
def split_groups(pattern: str) -> tuple[list[str], list[str]]:
    """A route regex's literal pieces and its top-level capture groups' bodies, in order."""
    pattern = pattern.removesuffix("$")
    pieces, groups = [""], []
    depth, start, i = 0, 0, 0
    while i < len(pattern):
        c = pattern[i]
        if c == "\\":
            if depth == 0:
                pieces[-1] += pattern[i + 1] if i + 1 < len(pattern) else ""
            i += 2
            continue
        if c == "(":
            if depth == 0:
                start = i + 1
            depth += 1
        elif c == ")":
            depth -= 1
            if depth == 0:
                groups.append(pattern[start:i])
                pieces.append("")
        elif depth == 0:
            pieces[-1] += c
        i += 1
    return pieces, groups


def route_pattern(rule: Any) -> tuple[str, type] | None:
    """(regex, handler class) of a route as services list them, or None for other rules."""
    if isinstance(rule, tuple):
        return rule[0], rule[1]
    matcher = getattr(rule, "matcher", None)
    regex = getattr(matcher, "regex", None)
    target = getattr(rule, "target", None)
    if regex is not None and isinstance(target, type):
        return regex.pattern, target
    return None


def path_names(handler: type, method: str, op: Operation, count: int) -> list[str]:
    if op.path is not None:
        names = list(op.path.model_fields)
    elif op.path_names is not None:
        names = list(op.path_names)
    else:
        params = list(inspect.signature(getattr(handler, method.lower())).parameters.values())[1:]
        names = [p.name for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    if len(names) != count:
        raise ValueError(f"{handler.__name__}.{method.lower()}: {count} path groups, names {names}")
    return names


def is_internal(path: str) -> bool:
    return path == "/internal" or path.startswith("/internal/")


# -- schemas -------------------------------------------------------------------------------
class Schemas:
    """Component schemas of one fragment; names carry ``prefix`` so services never clash."""

    def __init__(self, prefix: str) -> None:
        self.prefix = prefix
        self.components: dict[str, Any] = {ERROR_SCHEMA: ErrorBody.model_json_schema()}

    def ref(self, name: str) -> dict[str, str]:
        return {"$ref": f"#/components/schemas/{name}"}

    def schema(self, tp: Any, mode: str) -> dict[str, Any]:
        if tp is ErrorBody:
            return self.ref(ERROR_SCHEMA)
        template = f"#/components/schemas/{self.prefix}{{model}}"
        out = TypeAdapter(tp).json_schema(ref_template=template, mode=mode)  # type: ignore[arg-type]
        for name, sub in out.pop("$defs", {}).items():
            self.components[self.prefix + name] = sub
        if isinstance(tp, type) and issubclass(tp, BaseModel):
            name = self.prefix + tp.__name__
            self.components[name] = out
            return self.ref(name)
        return out


def _query_parameters(model: type[BaseModel], schemas: Schemas) -> list[dict[str, Any]]:
    template = f"#/components/schemas/{schemas.prefix}{{model}}"
    full = model.model_json_schema(ref_template=template, mode="validation")
    for name, sub in full.pop("$defs", {}).items():
        schemas.components[schemas.prefix + name] = sub
    required = set(full.get("required", ()))
    params = []
    for name, prop in full.get("properties", {}).items():
        prop = dict(prop)
        prop.pop("title", None)
        param: dict[str, Any] = {"name": name, "in": "query", "required": name in required, "schema": prop}
        if "description" in prop:
            param["description"] = prop.pop("description")
        params.append(param)
    return params


def _content(tp: Any, schemas: Schemas) -> dict[str, Any] | None:
    if tp is None:
        return None
    if isinstance(tp, str):  # a media type (TEXT_PLAIN, "text/html", "*/*"): not JSON
        return {tp: {"schema": {"type": "string"}}}
    return {"application/json": {"schema": schemas.schema(tp, "serialization")}}


def operation_object(
    handler: type, method: str, op: Operation, groups: list[str], schemas: Schemas, operation_id: str
) -> dict[str, Any]:
    names = path_names(handler, method, op, len(groups))
    typed = {p["name"]: p["schema"] for p in _query_parameters(op.path, schemas)} if op.path else {}
    params: list[dict[str, Any]] = [
        {
            "name": n,
            "in": "path",
            "required": True,
            "schema": typed.get(n) or {"type": "string", "pattern": f"^(?:{g})$"},
        }
        for n, g in zip(names, groups)
    ]
    if op.query is not None:
        params += _query_parameters(op.query, schemas)
    out: dict[str, Any] = {"operationId": operation_id, "summary": op.summary}
    if op.description:
        out["description"] = op.description
    if params:
        out["parameters"] = params
    if op.body is not None:
        out["requestBody"] = {
            "required": True,
            "content": {"application/json": {"schema": schemas.schema(op.body, "validation")}},
        }
    responses: dict[str, Any] = {}
    for status, tp in op.responses.items():
        resp: dict[str, Any] = {"description": STATUS_TEXT.get(status, str(status))}
        content = _content(tp, schemas)
        if content:
            resp["content"] = content
        if status in op.headers:
            resp["headers"] = {
                h: {"description": d, "schema": {"type": "string"}} for h, d in op.headers[status].items()
            }
        responses[str(status)] = resp
    errors = set(op.errors)
    if params or op.body is not None:
        errors.add(400)
    if op.body is not None:
        errors.add(413)
    if op.auth:
        errors.add(401)
    for status in sorted(errors):
        add_error(responses, status)
    out["responses"] = responses
    if op.auth:
        out["security"] = [{"bearer": []}]
    out.update(op.extensions)
    return out


def add_error(responses: dict[str, Any], status: int) -> None:
    responses.setdefault(
        str(status),
        {
            "description": STATUS_TEXT.get(status, str(status)),
            "content": {"application/json": {"schema": {"$ref": f"#/components/schemas/{ERROR_SCHEMA}"}}},
        },
    )


@dataclass
class Fragment:
    paths: dict[str, dict[str, Any]]
    components: dict[str, Any]
    undeclared: list[str]

    def as_dict(self) -> dict[str, Any]:
        return {"paths": self.paths, "components": {"schemas": self.components}, "undeclared": self.undeclared}


def fragment(routes: Iterable[Any], prefix: str = "", *, id_prefix: str | None = None) -> Fragment:
    """The paths and schemas of ``routes`` (a service's route table); internal routes skipped."""
    schemas = Schemas(prefix)
    paths: dict[str, dict[str, Any]] = {}
    undeclared: list[str] = []
    for rule in routes:
        found = route_pattern(rule)
        if found is None:
            continue
        pattern, handler = found
        pieces, groups = split_groups(pattern)
        if is_internal(pieces[0]):
            continue
        for method in implemented_methods(handler):
            op = declared(handler, method)
            if op is None:
                if not getattr(handler, "openapi_exclude", False):
                    undeclared.append(f"{method} {pattern}")
                continue
            names = path_names(handler, method, op, len(groups))
            template = pieces[0] + "".join("{" + n + "}" + p for n, p in zip(names, pieces[1:]))
            op_id = (id_prefix or prefix) + method.lower() + re.sub(r"[^A-Za-z0-9]+", "_", template).rstrip("_")
            paths.setdefault(template, {})[method.lower()] = operation_object(
                handler, method, op, groups, schemas, op_id
            )
    return Fragment(paths, schemas.components, undeclared)


def fragment_handler(routes: Callable[[], Iterable[Any]], prefix: str = "") -> type[tornado.web.RequestHandler]:
    """A handler serving this service's fragment at :data:`FRAGMENT_PATH` (service credential)."""
    from common.handler import BaseHandler  # common.handler imports this module

    class FragmentHandler(BaseHandler):
        _cached: dict[str, Any] | None = None

        def get(self) -> None:
            self.require_service()
            cls = type(self)
            if cls._cached is None:
                cls._cached = fragment(routes(), prefix).as_dict()
            self.write_json(cls._cached)

    return FragmentHandler


def with_fragment(table: list[Any], described: list[Any] | None = None) -> list[Any]:
    """``table`` plus the route serving its fragment (common.service.make_app adds it):
    the fragment of ``described`` when given (a table whose mounted parts are served by
    child applications, which the fragment cannot see through)."""
    shown = table if described is None else described
    return [*table, (FRAGMENT_PATH, fragment_handler(lambda: shown))]
