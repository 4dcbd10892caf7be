"""chat's plain functions, without the stack."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from chat.cache import parse_nodes, user_key
from chat.chats import ws_base, ws_url
from chat.handlers import FloodGuard
from chat.settings import ChatSettings
from chat.store import Chat, ChatMessage, message_id

pytestmark = pytest.mark.unit


@pytest.mark.parametrize(
    ("public", "expected"),
    [
        ("http://127.0.0.1:8000", "ws://127.0.0.1:8000/chat/chat/"),
        ("http://gw.example:8000/", "ws://gw.example:8000/chat/chat/"),
        ("https://barber.example", "wss://barber.example/chat/chat/"),
        ("https://barber.example/api", "wss://barber.example/api/chat/chat/"),
    ],
)
def test_ws_urls_point_at_the_gateway(public: str, expected: str) -> None:
    assert ws_base(public) == expected
    assert ws_url(ws_base(public), "abc") == expected + "abc"


def test_parse_nodes() -> None:
    nodes = parse_nodes("127.0.0.1:17001, 127.0.0.1:17002,")
    assert [(n.host, n.port) for n in nodes] == [("127.0.0.1", 17001), ("127.0.0.1", 17002)]
    for bad in ("", "localhost", "host:port", ":17001"):
        with pytest.raises(ValueError):
            parse_nodes(bad)
    assert user_key(42) == "user:42"


def test_flood_guard_passes_a_burst_then_refuses() -> None:
    guard = FloodGuard(rate=0.001, burst=5)
    assert [guard.allow() for _ in range(7)] == [True] * 5 + [False] * 2


def test_message_ids() -> None:
    assert message_id("c1", 7, "abc") == message_id("c1", 7, "abc") == "c1:7:abc"
    assert message_id("c1", 8, "abc") != message_id("c1", 7, "abc")
    generated = {message_id("c1", 7, None) for _ in range(1000)}
    assert len(generated) == 1000


def test_chat_participants() -> None:
    chat = Chat("c", customer_id=1, employee_id=2, created_at=0.0)
    assert chat.is_participant(1) and chat.is_participant(2) and not chat.is_participant(3)
    assert chat.other(1) == 2 and chat.other(2) == 1


def test_message_frame_is_the_public_json() -> None:
    doc = {
        "_id": "x",
        "chat_id": "c",
        "seq": 3,
        "message": "héllo",
        "sent_at": "2026-01-01T00:00:00.000Z",
        "sender": {"id": 1, "first_name": "A", "last_name": "B"},
        "created_at": 1.0,
        "client_id": "k",
    }
    msg = ChatMessage.from_doc(doc)
    assert json.loads(msg.frame) == {
        "type": "chat_message",
        "chat_id": "c",
        "seq": 3,
        "message": "héllo",
        "sender": {"id": 1, "first_name": "A", "last_name": "B"},
        "sent_at": "2026-01-01T00:00:00.000Z",
        "client_id": "k",
    }
    assert msg.frame_bytes == len(msg.frame.encode())
    again = ChatMessage.from_public(json.loads(msg.frame), frame=msg.frame)
    assert (again.chat_id, again.seq, again.frame) == ("c", 3, msg.frame)


def test_settings_defaults_join_the_local_stack() -> None:
    from stack.layout import Layout, service_env

    defaults = {name: f.default for name, f in ChatSettings.model_fields.items()}
    local = service_env(Layout(Path("."), 0))
    assert defaults["port"] == 8201
    assert defaults["mongo_url"] == local["MONGO_URL"]
    assert defaults["redis_cluster_nodes"] == local["REDIS_CLUSTER_NODES"]
    assert defaults["gateway_public_url"] == local["GATEWAY_PUBLIC_URL"]
    assert defaults["redis_url"] == local["REDIS_URL"]
    assert defaults["discovery_url"] == local["DISCOVERY_URL"]
    assert defaults["user_cache_ttl_s"] == 3600
    assert defaults["chat_max_message_chars"] == 4000


def test_parse_since() -> None:
    from chat.chats import CLOSE_BAD_REQUEST, SocketRefused, parse_since

    assert parse_since(None) is None and parse_since("") is None
    assert parse_since("0") == 0 and parse_since("17") == 17
    for bad in ("-1", "x", "1.5"):
        with pytest.raises(SocketRefused) as e:
            parse_since(bad)
        assert e.value.code == CLOSE_BAD_REQUEST


async def test_a_cache_connection_torn_down_mid_command_is_a_cache_error() -> None:
    from chat.cache import CACHE_ERRORS, UserCache

    async def torn_down() -> None:
        # What redis-py raises when a concurrent timeout dropped the connection it writes on.
        raise AttributeError("'NoneType' object has no attribute 'writelines'")

    cache = UserCache("127.0.0.1:1")
    with pytest.raises(CACHE_ERRORS):
        await cache._run(torn_down())
