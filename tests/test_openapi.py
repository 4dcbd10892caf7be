"""The public OpenAPI document (GET /openapi.json on the gateway) against the code.

Every route of every service's app is in the document and the document has nothing
else; internal routes are not in it and cannot be reached through the gateway; every
numeric query parameter it declares is bounded, and a value past a bound is a 400 that
names the parameter, never a 500.
"""

from __future__ import annotations

from collections.abc import Callable
from types import SimpleNamespace
from typing import Any
from urllib.parse import quote, urlencode

import pytest

import authen.handlers
import chat.handlers
import coordinator.handlers
import etl.handlers
import gateway.handlers
from common.openapi import FRAGMENT_PATH, fragment, implemented_methods, is_internal, route_pattern
from gateway.policy import is_test_only
from stack.services import SERVICES
from tests.http import call
from tests.stackproc import StackProcess
from tests.test_chat_support import make_user
from tests.util import wait_until


def _service_env(name: str) -> dict[str, str]:
    return next(spec.env for spec in SERVICES if spec.name == name)


# How to build each routed service's route table as the stack runs it (a new routed
# service adds its line: its handlers declare their operations the same way).
SERVICE_ROUTES: dict[str, Callable[[], list[Any]]] = {
    "authen": lambda: authen.handlers.routes(
        SimpleNamespace(enable_sleepy=_service_env("authen").get("ENABLE_SLEEPY") == "1")
    ),
    "chat": lambda: chat.handlers.routes(),
    "etl": lambda: etl.handlers.routes(),
}


def gateway_routes(services: list[str]) -> list[Any]:
    return coordinator.handlers.routes() + gateway.handlers.routes(services)


def public_operations(routes: list[Any], prefix: str = "") -> set[tuple[str, str]]:
    """(METHOD, public path template) of every non-internal route's methods, from the code."""
    doc = fragment(routes)
    return {(method.upper(), prefix + path) for path, ops in doc.paths.items() for method in ops}


async def complete_spec(gateway_url: str) -> dict:
    reply = await call("GET", gateway_url + "/openapi.json")
    assert reply.code == 200, reply
    assert reply.headers["Content-Type"].startswith("application/json")
    return reply.json if "x-missing-services" not in reply.json["info"] else {}


@pytest.fixture(scope="module")
async def spec(stack: StackProcess) -> dict:
    return await wait_until(
        lambda: complete_spec(stack.url("gateway")), timeout=60, message="every service's part of the spec"
    )


@pytest.mark.unit
def test_every_public_handler_method_declares_its_operation() -> None:
    tables = {name: build() for name, build in SERVICE_ROUTES.items()}
    tables["gateway"] = gateway_routes(list(SERVICE_ROUTES))
    for name, table in tables.items():
        assert fragment(table).undeclared == [], name
        # The check itself sees every handler method (nothing is skipped unnoticed).
        for rule in table:
            found = route_pattern(rule)
            if found and not is_internal(found[0]) and not getattr(found[1], "openapi_exclude", False):
                assert implemented_methods(found[1]), found


async def test_spec_has_every_route_and_nothing_else(spec: dict) -> None:
    assert spec["openapi"].startswith("3.1")
    expected = public_operations(gateway_routes(list(SERVICE_ROUTES)))
    for name, build in SERVICE_ROUTES.items():
        expected |= public_operations(build(), f"/{name}")
    if _service_env("gateway").get("ENABLE_SLEEPY") != "1":
        expected = {(m, p) for m, p in expected if not is_test_only(p)}  # not routed, so not documented
    documented = {(m.upper(), path) for path, ops in spec["paths"].items() for m in ops}
    assert documented == expected, (sorted(documented - expected), sorted(expected - documented))
    assert ("DELETE", "/admin/users/{user_id}") in documented
    assert ("GET", "/chat/chats/history") in documented
    assert not [p for p in spec["paths"] if "/internal" in p]


async def test_every_error_answer_is_documented_as_detail(spec: dict) -> None:
    error = spec["components"]["schemas"]["Error"]
    assert error["required"] == ["detail"] and error["properties"]["detail"]["type"] == "string"
    for path, ops in spec["paths"].items():
        for method, op in ops.items():
            responses = op["responses"]
            assert any(code.startswith("2") or code == "101" for code in responses), (method, path)
            for code, resp in responses.items():
                if code[0] in "45":
                    assert resp["content"]["application/json"]["schema"] == {"$ref": "#/components/schemas/Error"}
            if op.get("security"):
                assert "401" in responses, (method, path)
            if path.startswith(("/authen/", "/chat/")):
                assert {"502", "503", "504"} <= set(responses), (method, path)


async def test_schema_references_resolve(spec: dict) -> None:
    names = set(spec["components"]["schemas"])
    missing: list[str] = []

    def walk(node: Any) -> None:
        if isinstance(node, dict):
            ref = node.get("$ref")
            if isinstance(ref, str) and ref.removeprefix("#/components/schemas/") not in names:
                missing.append(ref)
            for v in node.values():
                walk(v)
        elif isinstance(node, list):
            for v in node:
                walk(v)

    walk(spec)
    assert missing == []


async def test_the_fragments_are_internal(stack: StackProcess) -> None:
    for service in SERVICE_ROUTES:
        reply = await call("GET", f"{stack.url('gateway')}/{service}{FRAGMENT_PATH}")
        assert reply.code == 404, reply
        direct = await call("GET", stack.url(service) + FRAGMENT_PATH)
        assert direct.code == 403, direct
        assert direct.json == {"detail": "service credential required"}


def _numeric_params(spec: dict) -> list[tuple[str, str, dict]]:
    out = []
    for path, ops in spec["paths"].items():
        for method, op in ops.items():
            for param in op.get("parameters", ()):
                if param["in"] == "query" and param["schema"].get("type") in ("integer", "number"):
                    out.append((method.upper(), path, param))
    return out


async def test_every_numeric_query_parameter_is_bounded(spec: dict) -> None:
    params = _numeric_params(spec)
    assert len(params) >= 8
    for method, path, param in params:
        schema = param["schema"]
        assert "minimum" in schema and "maximum" in schema, (method, path, param)


async def test_out_of_bounds_numbers_are_400_naming_the_parameter(
    stack: StackProcess, spec: dict, admin_token: str
) -> None:
    gw = stack.url("gateway")
    customer = await make_user(stack, "customer")
    tried = 0
    for method, path, param in _numeric_params(spec):
        if "{" in path:
            continue
        token = admin_token if path.startswith(("/admin/", "/etl/")) else customer.token
        schema, name = param["schema"], param["name"]
        required = {
            p["name"]: "x"
            for p in spec["paths"][path][method.lower()].get("parameters", ())
            if p["required"] and p["name"] != name
        }
        for bad in (schema["maximum"] + 1, 10**30, schema["minimum"] - 1, "1.5e3", "nan", " 1"):
            query = urlencode({**required, name: bad}, quote_via=quote)
            reply = await call(method, f"{gw}{path}?{query}", token=token)
            assert reply.code == 400, (method, path, query, reply)
            assert reply.json["detail"].startswith(f"{name}: "), (query, reply)
            tried += 1
    assert tried >= 60


async def test_history_before_past_the_database_integer_is_400(stack: StackProcess) -> None:
    """issue 10's request: it used to overflow the MongoDB driver's integer (a 500)."""
    customer = await make_user(stack, "customer")
    reply = await call(
        "GET", f"{stack.url('gateway')}/chat/chats/history?id=abc&before=99999999999999999999", token=customer.token
    )
    assert reply.code == 400, reply
    assert reply.json["detail"].startswith("before: ")


async def test_a_405_lists_the_allowed_methods(stack: StackProcess) -> None:
    customer = await make_user(stack, "customer")
    reply = await call("PUT", stack.url("gateway") + "/chat/chats/history", raw=b"{}", token=customer.token)
    assert reply.code == 405, reply
    assert reply.headers["Allow"] == "GET"
    assert reply.json == {"detail": "Method Not Allowed"}
