"""chat's HTTP and WebSocket handlers (thin: parse, call chat.chats / chat.fanout, write).

Identity comes only from the verified token (``Authorization: Bearer`` for REST;
``?token=`` or the ``Sec-WebSocket-Protocol`` pair ``bearer, <token>`` for the socket).
A client-sent ``X-User`` is ignored.
"""

from __future__ import annotations

import asyncio
import functools
import json
import logging
import socket
import time
from typing import Any

import tornado.websocket
from prometheus_client import CONTENT_TYPE_LATEST

from chat import chats
from chat.chats import CLOSE_DELETING, CLOSE_TOO_MANY_SOCKETS, CLOSE_UNAUTHENTICATED
from chat.context import ChatContext
from chat.fanout import CLOSE_TOO_SLOW, CLOSE_UNAVAILABLE, Room, Subscription
from chat.metrics import render
from chat.schemas import ChatQuery, ChatRef, ChatSummary, HistoryPage, HistoryQuery, ListQuery, PurgeQuery, StartQuery
from chat.store import StoreUnavailable
from chat.users import AuthenUnavailable
from common.errors import BadRequest, Conflict
from common.handler import CONTEXT, VERIFIER, BaseHandler, decode_json_object, offered_subprotocols, websocket_token
from common.logs import REQUEST_ID_HEADER, request_id_var, sane_request_id
from common.openapi import TEXT_PLAIN, StatusBody, api
from common.participant import tx_routes
from common.tokens import Claims, verify_or_none

log = logging.getLogger("barber.chat.ws")

SUBPROTOCOL = "bearer"
CLIENT_ID_MAX = 64


class ChatHandler(BaseHandler):
    @property
    def context(self) -> ChatContext:
        return self.settings[CONTEXT]

    @property
    def ws_base(self) -> str:
        return chats.ws_base(self.context.settings.gateway_public_url)


class StartChatHandler(ChatHandler):
    @api(
        "Start (or find) the caller's chat with a barber; customers only",
        query=StartQuery,
        responses={201: ChatRef, 200: ChatRef},
        errors=(403, 404, 409, 503),
        auth=True,
    )
    async def post(self) -> None:
        caller = self.require_user()
        employee_id = self.parse_query(StartQuery).employee_id
        body, created = await chats.start_chat(
            self.context.store, self.context.users, caller, employee_id, self.ws_base
        )
        self.write_json(body, 201 if created else 200)


class ListMyHandler(ChatHandler):
    @api(
        "The caller's chats, newest activity first",
        query=ListQuery,
        responses={200: list[ChatSummary]},
        errors=(503,),
        auth=True,
    )
    async def get(self) -> None:
        caller = self.require_user()
        q = self.parse_query(ListQuery)
        self.write_json(
            await chats.list_mine(
                self.context.store, self.context.users, caller, self.ws_base, limit=q.limit, offset=q.offset
            )
        )


class ConnectHandler(ChatHandler):
    @api(
        "The socket URL of one of the caller's chats",
        query=ChatQuery,
        responses={200: ChatRef},
        errors=(403, 404, 409, 503),
        auth=True,
    )
    async def get(self) -> None:
        caller = self.require_user()
        chat_id = self.parse_query(ChatQuery).id
        self.write_json(await chats.connect(self.context.store, caller, chat_id, self.ws_base))


class HistoryHandler(ChatHandler):
    @api(
        "Older messages of one of the caller's chats, newest first",
        query=HistoryQuery,
        responses={200: HistoryPage},
        errors=(403, 404, 503),
        auth=True,
    )
    async def get(self) -> None:
        caller = self.require_user()
        q = self.parse_query(HistoryQuery)
        self.write_json(await chats.history(self.context.store, caller, q.id, q.before, q.limit))


class StatusHandler(ChatHandler):
    """Public: up or degraded. Counters and errors only for callers with the service
    credential or an admin token."""

    @api("This instance's health (details for services and admins)", responses={200: StatusBody})
    async def get(self) -> None:
        ctx = self.context
        try:
            mongo_ok = await asyncio.wait_for(ctx.store.ping(), 1.0)
        except TimeoutError:
            mongo_ok = False
        public = {"status": "ok" if mongo_ok else "degraded", "service": "chat", "instance": ctx.instance}
        if not self.may_see_details():
            self.write_json(public)
            return
        cache = ctx.cache
        self.write_json(
            {
                **public,
                "sockets": ctx.hub.socket_count,
                "users_with_sockets": len(ctx.sockets.by_user),
                "sockets_refused_over_cap": ctx.sockets.refused,
                "rooms": len(ctx.hub.rooms),
                "mongo": "ok" if mongo_ok else "unavailable",
                "pubsub_connected": ctx.hub.bus.connected,
                "publish_backlog": ctx.hub.bus.backlog,
                "write_queue": ctx.hub.writer.queued,
                "authen_instances": len(ctx.users.view.instances),
                "cache": {**cache.stats.as_dict(), "available": cache.available, "last_error": cache.last_error},
                "fanout": ctx.hub.stats.as_dict(),
            }
        )


class MetricsHandler(ChatHandler):
    @api("Prometheus metrics of this instance", responses={200: TEXT_PLAIN})
    def get(self) -> None:
        self.set_header("Content-Type", CONTENT_TYPE_LATEST)
        self.finish(render(self.context.metrics))


# -- the socket ------------------------------------------------------------------------
class FloodGuard:
    """A token bucket per connection: ``rate`` messages per second, bursts of ``burst``."""

    def __init__(self, rate: float, burst: int) -> None:
        self.rate = rate
        self.burst = float(burst)
        self.tokens = float(burst)
        self.stamp = time.monotonic()

    def allow(self) -> bool:
        now = time.monotonic()
        self.tokens = min(self.burst, self.tokens + (now - self.stamp) * self.rate)
        self.stamp = now
        if self.tokens >= 1.0:
            self.tokens -= 1.0
            return True
        return False


class ChatSocket(tornado.websocket.WebSocketHandler):
    """``/chat/<chat_id>``: one participant's real-time connection to one chat."""

    @property
    def context(self) -> ChatContext:
        return self.settings[CONTEXT]

    def initialize(self) -> None:
        ctx = self.context
        self.sub: Subscription[Room] | None = None
        self._buffered = 0
        self._low_water = ctx.settings.chat_ws_max_buffer_bytes // 2
        self._drained = asyncio.Event()
        self._drained.set()
        self._closing = False
        s = ctx.settings
        self.flood = FloodGuard(s.chat_flood_rate_per_s, s.chat_flood_burst)
        self.request_id = sane_request_id(self.request.headers.get(REQUEST_ID_HEADER))
        # Set once the token is verified: counted against the user's socket cap, closed
        # when the token expires or is revoked.
        self.user_id: int | None = None
        self.issued_at = 0
        self._expiry: asyncio.TimerHandle | None = None

    def check_origin(self, origin: str) -> bool:
        # Authentication is by token, never by cookie, so another origin gains nothing.
        return True

    def select_subprotocol(self, subprotocols: list[str]) -> str | None:
        # Browsers cannot set headers on a WebSocket; they offer ["bearer", <token>] or
        # "bearer.<token>" (common.handler.websocket_token reads either); the answer must
        # name one of the offers, or the browser fails the handshake.
        for proto in subprotocols:
            if proto.lower() == SUBPROTOCOL or proto.lower().startswith(SUBPROTOCOL + "."):
                return proto
        return None

    # -- Transport (what chat.fanout needs) -------------------------------------------
    @property
    def is_closed(self) -> bool:
        return self._closing or self.ws_connection is None or self.ws_connection.is_closing()

    @property
    def buffered_bytes(self) -> int:
        return self._buffered

    def send_frame(self, text: str, nbytes: int) -> None:
        if self.is_closed:
            return
        try:
            fut = self.write_message(text)
        except tornado.websocket.WebSocketClosedError:
            self._closing = True
            return
        self._buffered += nbytes
        if self._buffered > self._low_water:
            self._drained.clear()
        fut.add_done_callback(functools.partial(self._flushed, nbytes=nbytes))
        if self._buffered > 2 * self.context.settings.chat_ws_max_buffer_bytes:
            # Deliveries stay under the limit by themselves (fanout pauses a socket at
            # it); this is the backstop for everything else written to the socket.
            self.context.hub.stats.slow_disconnects += 1
            self.close_with(CLOSE_TOO_SLOW, "client is not reading")

    def _flushed(self, fut: asyncio.Future[None], nbytes: int) -> None:
        if not fut.cancelled():
            fut.exception()  # a closed stream is expected here; not worth a log line
        self._buffered = max(0, self._buffered - nbytes)
        if self._buffered <= self._low_water:
            self._drained.set()

    async def drain(self, timeout: float) -> bool:
        if self._buffered <= self._low_water:
            return not self.is_closed
        try:
            await asyncio.wait_for(self._drained.wait(), timeout)
        except TimeoutError:
            return False
        return not self.is_closed

    def close_with(self, code: int, reason: str) -> None:
        if self._closing:
            return
        self._closing = True
        if code == CLOSE_TOO_SLOW:
            log.warning(
                "closing a socket of user#%s: %d bytes not taken by the client",
                self.sub.user.id if self.sub else "?",
                self._buffered,
            )
        self.close(code, reason)

    @api(
        "The real-time chat socket (a WebSocket upgrade)",
        responses={101: None},
        errors=(400,),
        path_names=("chat_id",),
        extensions={"x-websocket": True},
        description=(
            "Token as `?token=` or the `Sec-WebSocket-Protocol` pair `bearer, <token>`; `?since=<seq>` first "
            'replays every later message. Client frames `{"type": "chat_message", "message": str, '
            '"client_id"?: str}`; server frames as in the history\'s messages, or `{"type": "error", '
            '"code", "detail"}`. Close codes: 4401 not authenticated, 4403 not a participant, 4404 no '
            "such chat, 4409 chat being deleted."
        ),
    )
    async def get(self, *args: Any, **kwargs: Any) -> None:
        await super().get(*args, **kwargs)

    # -- protocol ---------------------------------------------------------------------
    def _send_json(self, obj: dict[str, Any]) -> None:
        text = json.dumps(obj, separators=(",", ":"))
        self.send_frame(text, len(text))

    def _error(self, code: str, detail: str, client_id: Any = None) -> None:
        frame: dict[str, Any] = {"type": "error", "code": code, "detail": detail}
        if isinstance(client_id, str):
            frame["client_id"] = client_id
        self._send_json(frame)

    def _claims(self) -> Claims | None:
        token = websocket_token(
            self.get_query_argument("token", None),
            offered_subprotocols(self.request.headers.get("Sec-WebSocket-Protocol")),
            self.request.headers.get("Authorization"),
        )
        return verify_or_none(self.settings.get(VERIFIER), token)

    def _limit_kernel_buffer(self) -> None:
        size = self.context.settings.chat_ws_sndbuf_bytes
        stream = getattr(self.ws_connection, "stream", None)
        if size and stream is not None and stream.socket is not None:
            stream.socket.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, size)

    def _hold(self, claims: Claims | None) -> bool:
        """Count the socket against its user's cap and arm its expiry; False if refused."""
        if claims is None:
            return True  # admit refuses it
        cap = self.context.sockets
        if not cap.add(claims.user_id, self):
            log.warning("refusing a socket of user#%d: %d already open here", claims.user_id, cap.cap)
            self.close_with(CLOSE_TOO_MANY_SOCKETS, f"too many sockets: at most {cap.cap} per user")
            return False
        self.user_id, self.issued_at = claims.user_id, claims.issued_at
        # The socket lives no longer than the token that opened it.
        self._expiry = asyncio.get_running_loop().call_later(
            max(0.0, claims.expires_at - time.time()), self.close_with, CLOSE_UNAUTHENTICATED, "token expired"
        )
        return True

    def _release(self) -> None:
        if self._expiry is not None:
            self._expiry.cancel()
            self._expiry = None
        if self.user_id is not None:
            self.context.sockets.discard(self.user_id, self)
            self.user_id = None

    async def open(self, chat_id: str) -> None:
        request_id_var.set(self.request_id)
        ctx = self.context
        self._limit_kernel_buffer()
        claims = self._claims()
        if not self._hold(claims):
            return
        try:
            chat, user = await chats.admit(ctx.store, ctx.users, claims, chat_id)
            since = chats.parse_since(self.get_query_argument("since", None))
            if self.is_closed:
                return
            sub = await ctx.hub.join(chat, self, user, since)
        except chats.SocketRefused as e:
            self._release()
            self.close_with(e.code, e.reason)
            return
        except (StoreUnavailable, AuthenUnavailable) as e:
            log.warning("refusing a socket for chat %s: %s", chat_id, e.detail)
            self._release()
            self.close_with(CLOSE_UNAVAILABLE, "temporarily unavailable; try again")
            return
        if self.is_closed:
            # The client left while we were setting up.
            await ctx.hub.leave(sub)
            return
        self.sub = sub
        ctx.hub.stats.connections += 1
        log.info(
            "user#%d joined chat %s (since=%s)",
            user.id,
            chat.chat_id,
            since,
            extra={"user.id": user.id, "barber.chat.id": chat.chat_id},
        )

    async def on_message(self, data: str | bytes) -> None:
        sub = self.sub
        if sub is None or self.is_closed:
            return
        request_id_var.set(self.request_id)
        if not self.flood.allow():
            self.context.hub.stats.flood_rejections += 1
            self._error("rate_limited", f"too many messages: at most {self.flood.rate:g} per second")
            return
        try:
            obj = decode_json_object(data, "frame")
        except BadRequest as e:
            self._error("malformed", e.detail)
            return
        client_id = obj.get("client_id")
        if obj.get("type") != "chat_message":
            self._error("unknown_type", f"unknown message type {str(obj.get('type'))[:40]!r}", client_id)
            return
        if client_id is not None and (not isinstance(client_id, str) or not 0 < len(client_id) <= CLIENT_ID_MAX):
            self._error("invalid", f"client_id: must be a string of 1..{CLIENT_ID_MAX} characters")
            return
        text = obj.get("message")
        if not isinstance(text, str) or not text.strip():
            self._error("empty", "message: must be a non-empty string", client_id)
            return
        limit = self.context.settings.chat_max_message_chars
        if len(text) > limit:
            self._error("too_long", f"message: at most {limit} characters", client_id)
            return
        try:
            await self.context.hub.send(sub, text, client_id)
        except Conflict as e:
            self._error("deleting", e.detail, client_id)
            self.close_with(CLOSE_DELETING, "chat is being deleted")
        except StoreUnavailable as e:
            self._error("unavailable", e.detail, client_id)
        except BadRequest as e:  # a message no store can hold (refused alone, see fanout)
            self._error("invalid", e.detail, client_id)

    def on_close(self) -> None:
        self._release()
        self._closing = True
        self._drained.set()
        sub, self.sub = self.sub, None
        if sub is not None:
            self.context.hub.spawn(self.context.hub.leave(sub))


# -- internal: the saga steps of the deletion coordinator (service credential only); the
# two-phase-commit endpoints are common.participant's --
class InternalHandler(ChatHandler):
    def prepare(self) -> None:
        super().prepare()
        self.require_service()


class PurgeHandler(InternalHandler):
    async def post(self, user_id: str) -> None:
        limit = self.parse_query(PurgeQuery).limit
        self.write_json(await self.context.participant.purge(int(user_id), limit))


class CacheEntryHandler(InternalHandler):
    async def delete(self, user_id: str) -> None:
        await self.context.participant.invalidate(int(user_id))
        self.write_json({"user_id": int(user_id), "invalidated": True})


def routes() -> list[tuple[str, type]]:
    return [
        (r"/chats/start", StartChatHandler),
        (r"/chats/list/my", ListMyHandler),
        (r"/chats/connect", ConnectHandler),
        (r"/chats/history", HistoryHandler),
        (r"/chat/([^/]+)", ChatSocket),
        (r"/utilities/status", StatusHandler),
        (r"/metrics", MetricsHandler),
        *tx_routes(),
        (r"/internal/users/([0-9]{1,18})/purge", PurgeHandler),
        (r"/internal/cache/users/([0-9]{1,18})", CacheEntryHandler),
    ]
