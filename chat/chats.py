"""The chat REST operations as plain functions (handlers only parse and write JSON)."""

from __future__ import annotations

import asyncio
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from chat.store import Chat, ChatMessage, Store, iso_now
from chat.users import AuthenUnavailable, User, UserDirectory
from common.errors import BadRequest, Conflict, Forbidden, NotFound, Unauthorized
from common.tokens import Claims

# Socket close codes (application range), see docs/api.md.
CLOSE_BAD_REQUEST = 4400
CLOSE_UNAUTHENTICATED = 4401
CLOSE_FORBIDDEN = 4403
CLOSE_NOT_FOUND = 4404
CLOSE_DELETING = 4409
CLOSE_TOO_MANY_SOCKETS = 4429


class SocketRefused(Exception):
    """A socket that may not join its chat: closed with ``code`` and ``reason``."""

    def __init__(self, code: int, reason: str) -> None:
        super().__init__(f"{code}: {reason}")
        self.code = code
        self.reason = reason


HISTORY_MAX = 100
LIST_DEFAULT = 100
LIST_MAX = 500
CHAT_ID_MAX_LEN = 64


def ws_base(gateway_public_url: str) -> str:
    """``http://host:port`` -> ``ws://host:port/chat/chat/`` (https -> wss)."""
    parts = urlsplit(gateway_public_url)
    scheme = "wss" if parts.scheme == "https" else "ws"
    path = parts.path.rstrip("/") + "/chat/chat/"
    return urlunsplit((scheme, parts.netloc, path, "", ""))


def ws_url(base: str, chat_id: str) -> str:
    return base + chat_id


async def start_chat(
    store: Store, users: UserDirectory, caller: Claims, employee_id: int, base: str
) -> tuple[dict[str, Any], bool]:
    """The caller's (a customer's) chat with ``employee_id``; True when newly created."""
    if caller.user_type != "customer":
        raise Forbidden("only customers can start a chat")
    if employee_id == caller.user_id:
        raise BadRequest("employee_id: cannot start a chat with yourself")
    customer = await users.get(caller.user_id)
    if customer is None:
        raise Unauthorized("user no longer exists")
    employee = await users.get(employee_id)
    if employee is None:
        raise NotFound(f"no user with id {employee_id}")
    if employee.type != "employee":
        raise BadRequest(f"employee_id: user {employee_id} is not an employee")
    chat, created = await store.start_chat(caller.user_id, employee_id)
    if chat.deleting:
        raise Conflict("this chat is being deleted")
    return {"chat_id": chat.chat_id, "ws_url": ws_url(base, chat.chat_id)}, created


async def participant_chat(store: Store, caller: Claims, chat_id: str) -> Chat:
    """The chat, if the caller takes part in it: 404 unknown, 403 not a participant."""
    chat = await store.get_chat(chat_id) if 0 < len(chat_id) <= CHAT_ID_MAX_LEN else None
    if chat is None:
        raise NotFound("no such chat")
    if not chat.is_participant(caller.user_id):
        raise Forbidden("you are not a participant of this chat")
    return chat


async def connect(store: Store, caller: Claims, chat_id: str, base: str) -> dict[str, Any]:
    chat = await participant_chat(store, caller, chat_id)
    if chat.deleting:
        raise Conflict("this chat is being deleted")
    return {"chat_id": chat.chat_id, "ws_url": ws_url(base, chat.chat_id)}


async def history(store: Store, caller: Claims, chat_id: str, before: int | None, limit: int) -> dict[str, Any]:
    if not 1 <= limit <= HISTORY_MAX:
        raise BadRequest(f"limit: must be between 1 and {HISTORY_MAX}")
    chat = await participant_chat(store, caller, chat_id)
    messages = await store.messages_before(chat.chat_id, before, limit)
    return {
        "chat_id": chat.chat_id,
        "messages": [m.public for m in messages],
        # Pass as `before` to page further back; None when this page reached the start.
        "next_before": messages[-1].seq if len(messages) == limit and messages[-1].seq > 1 else None,
    }


async def list_mine(
    store: Store, users: UserDirectory, caller: Claims, base: str, *, limit: int = LIST_DEFAULT, offset: int = 0
) -> list[dict[str, Any]]:
    """A page of the caller's chats, newest activity first, with the other party and last
    message (``limit`` from ``offset``; the default page holds a usual list whole)."""
    if not 1 <= limit <= LIST_MAX or offset < 0:
        raise BadRequest(f"limit: must be between 1 and {LIST_MAX}; offset: at least 0")
    chats = await store.chats_of(caller.user_id)
    gate = asyncio.Semaphore(16)

    async def last_of(chat: Chat) -> tuple[Chat, ChatMessage | None]:
        async with gate:
            return chat, await store.last_message(chat.chat_id)

    ranked = sorted(
        await asyncio.gather(*(last_of(c) for c in chats)),
        key=lambda pair: pair[1].created_at if pair[1] is not None else pair[0].created_at,
        reverse=True,
    )

    async def describe(chat: Chat, last: ChatMessage | None) -> dict[str, Any]:
        other_id = chat.other(caller.user_id)
        async with gate:
            try:
                other = await users.get(other_id)
            except AuthenUnavailable:
                other = None  # names unknown for now; the list itself still answers
        return {
            "chat_id": chat.chat_id,
            "ws_url": ws_url(base, chat.chat_id),
            "other": other.public() if other is not None else {"id": other_id, "first_name": None, "last_name": None},
            "last_message": last.public if last is not None else None,
            "created_at": iso_now(chat.created_at),
            "last_activity_at": iso_now(last.created_at if last is not None else chat.created_at),
            "deleting": bool(chat.deleting),
        }

    # Only the page's other parties are looked up in authen.
    return list(await asyncio.gather(*(describe(c, last) for c, last in ranked[offset : offset + limit])))


def parse_since(raw: str | None) -> int | None:
    if raw is None or raw == "":
        return None
    try:
        since = int(raw)
    except ValueError:
        since = -1
    if since < 0:
        raise SocketRefused(CLOSE_BAD_REQUEST, "since: must be a non-negative integer")
    return since


async def admit(store: Store, users: UserDirectory, caller: Claims | None, chat_id: str) -> tuple[Chat, User]:
    """The chat and the (existing) user a socket joins it as, or :class:`SocketRefused`.

    Raises StoreUnavailable / AuthenUnavailable when that cannot be decided now."""
    if caller is None:
        raise SocketRefused(CLOSE_UNAUTHENTICATED, "authentication required: a valid token")
    chat = await store.get_chat(chat_id) if 0 < len(chat_id) <= CHAT_ID_MAX_LEN else None
    if chat is None:
        raise SocketRefused(CLOSE_NOT_FOUND, "no such chat")
    if not chat.is_participant(caller.user_id):
        raise SocketRefused(CLOSE_FORBIDDEN, "not a participant of this chat")
    if chat.deleting:
        raise SocketRefused(CLOSE_DELETING, "chat is being deleted")
    user = await users.get(caller.user_id)
    if user is None:
        raise SocketRefused(CLOSE_UNAUTHENTICATED, "user no longer exists")
    return chat, user
