"""common.internal.InternalClient against real HTTP servers (no stack): how a call fails
over between instances, what it carries, and what it says when no instance answers."""

from __future__ import annotations

import json
import socket
from collections.abc import AsyncIterator, Callable
from types import SimpleNamespace
from typing import Any

import pytest
import tornado.web
from tornado.httpserver import HTTPServer
from tornado.httputil import HTTPHeaders

from chat.users import AuthenUnavailable, UserDirectory
from common.discovery import Instance
from common.internal import SERVICE_TOKEN_HEADER, InternalClient, Refused, Unreachable
from common.logs import REQUEST_ID_HEADER, request_id_var


class Seen:
    def __init__(self) -> None:
        self.requests: list[tuple[str, str, HTTPHeaders, bytes]] = []


def answering(status: int, body: bytes, seen: Seen) -> type[tornado.web.RequestHandler]:
    class Handler(tornado.web.RequestHandler):
        def _answer(self) -> None:
            seen.requests.append(
                (self.request.method or "", self.request.uri or "", self.request.headers, self.request.body)
            )
            self.set_status(status)
            self.finish(body)

        def get(self) -> None:
            self._answer()

        def post(self) -> None:
            self._answer()

    return Handler


Serve = Callable[[int, bytes], Instance]


@pytest.fixture
async def serve() -> AsyncIterator[Serve]:
    servers: list[HTTPServer] = []
    seen = Seen()

    def start(status: int, body: bytes) -> Instance:
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        sock.listen(16)
        sock.setblocking(False)
        server = HTTPServer(tornado.web.Application([(r"/.*", answering(status, body, seen))]))
        server.add_sockets([sock])
        servers.append(server)
        return Instance(f"i{len(servers)}", "svc", "127.0.0.1", sock.getsockname()[1])

    start.seen = seen  # type: ignore[attr-defined]
    yield start
    for server in servers:
        server.stop()


def closed_port() -> Instance:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()
    return Instance("gone", "svc", "127.0.0.1", port)


def client(instances: list[Instance], **kwargs: Any) -> InternalClient:
    return InternalClient("svc", lambda: instances, "s3cret", timeout_s=2.0, **kwargs)


async def test_a_failing_instance_is_passed_over_and_the_call_carries_credential_and_request_id(serve: Serve) -> None:
    failing = serve(503, b'{"detail": "busy"}')
    good = serve(200, b'{"ok": true}')
    c = client([failing, good])
    token = request_id_var.set("rid-123")
    try:
        answers = [await c.call("POST", "/x") for _ in range(2)]
    finally:
        request_id_var.reset(token)
    assert answers == [{"ok": True}, {"ok": True}]
    seen: Seen = serve.seen  # type: ignore[attr-defined]
    assert len(seen.requests) == 3  # the rotating start tried the failing one once
    for method, _, headers, body in seen.requests:
        assert method == "POST" and body == b""
        assert headers[SERVICE_TOKEN_HEADER] == "s3cret" and headers[REQUEST_ID_HEADER] == "rid-123"
    assert (c.calls, c.failures) == (3, 1)


async def test_a_refusal_is_final(serve: Serve) -> None:
    refusing = serve(409, b'{"detail": "locked by another transaction"}')
    good = serve(200, b"{}")
    c = client([refusing, good])
    with pytest.raises(Refused) as e:
        await c.call("POST", "/internal/tx/g/prepare", {"user_id": 1})
    assert e.value.status == 409 and e.value.detail == "locked by another transaction"
    seen: Seen = serve.seen  # type: ignore[attr-defined]
    assert len(seen.requests) == 1 and json.loads(seen.requests[0][3]) == {"user_id": 1}


async def test_when_no_instance_answers_every_error_is_named(serve: Serve) -> None:
    failing = serve(500, b"oops")
    unreadable = serve(200, b"not json")
    gone = closed_port()
    c = client([failing, unreadable, gone])
    with pytest.raises(Unreachable) as e:
        await c.call("GET", "/y")
    assert len(e.value.errors) == 3
    for inst in (failing, unreadable, gone):
        assert inst.address in str(e.value)
    assert "answered 500" in str(e.value) and "unreadable" in str(e.value)


async def test_no_instance_known_is_unreachable() -> None:
    with pytest.raises(Unreachable) as e:
        await client([]).call("GET", "/y")
    assert e.value.errors == [] and "no instance is known" in str(e.value)


async def test_chat_user_lookup_names_every_authen_instance_that_failed(serve: Serve) -> None:
    failing = serve(503, b'{"detail": "database unavailable"}')
    bad = serve(200, b'{"no_id": 1}')
    users = UserDirectory(SimpleNamespace(instances=(failing, bad)), None, timeout_s=2.0)  # type: ignore[arg-type]
    with pytest.raises(AuthenUnavailable) as e:
        await users.check(7)
    assert failing.address in e.value.detail and bad.address in e.value.detail
    assert (users.authen_calls, users.authen_failures) == (2, 2)


async def test_chat_user_lookup_reads_no_such_user_as_none(serve: Serve) -> None:
    missing = serve(404, b'{"detail": "no user with id 7"}')
    users = UserDirectory(SimpleNamespace(instances=(missing,)), None, timeout_s=2.0)  # type: ignore[arg-type]
    assert await users.check(7) is None
    assert users.authen_failures == 0
