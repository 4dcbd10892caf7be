"""Builds chat's Tornado application and the services behind it."""

from __future__ import annotations

import asyncio
import logging

from chat.cache import UserCache
from chat.chats import CLOSE_UNAUTHENTICATED
from chat.context import ChatContext
from chat.fanout import Hub, HubConfig
from chat.handlers import routes
from chat.metrics import make_registry
from chat.participant import ChatParticipant
from chat.settings import ChatSettings
from chat.sockets import UserSockets
from chat.store import Store, StoreUnavailable
from chat.users import UserDirectory
from common.config import chat_frame_bytes
from common.discovery import InstanceView
from common.handler import REVOCATIONS
from common.participant import watch_outcomes
from common.service import ServiceApp, make_app
from common.tokens import Revocations

log = logging.getLogger("barber.chat")


async def _ensure_indexes(store: Store, attempts: int = 30) -> None:
    """MongoDB may still be starting: retry for a while, then give up (the supervisor
    restarts us)."""
    for attempt in range(1, attempts + 1):
        try:
            await store.ensure_indexes()
            return
        except StoreUnavailable as e:
            if attempt == attempts:
                raise SystemExit(f"chat: MongoDB unavailable at start: {e.detail}") from e
            log.warning("MongoDB not ready (%s); retrying", e.detail)
            await asyncio.sleep(1.0)


def hub_config(settings: ChatSettings) -> HubConfig:
    return HubConfig(
        replay_last=settings.chat_replay_last,
        send_timeout_s=settings.chat_ws_send_timeout_s,
        tail_check_s=settings.chat_tail_check_s,
        gap_skip_s=settings.chat_gap_skip_s,
        write_batch_max=settings.chat_write_batch_max,
        max_buffer_bytes=settings.chat_ws_max_buffer_bytes,
    )


async def build(settings: ChatSettings) -> ServiceApp:
    store = Store.connect(settings.mongo_url, settings.chat_mongo_db)
    await _ensure_indexes(store)
    cache = UserCache(
        settings.redis_cluster_nodes,
        ttl_s=settings.user_cache_ttl_s,
        op_timeout_s=settings.user_cache_timeout_s,
        cooldown_s=settings.user_cache_cooldown_s,
    )
    view = InstanceView(settings.discovery_url, "authen")
    await view.start()
    users = UserDirectory(view, cache, timeout_s=settings.authen_timeout_s)
    hub = Hub(store, settings.redis_url, hub_config(settings))
    await hub.start()
    sockets = UserSockets(settings.chat_max_sockets_per_user)
    participant = ChatParticipant(store, hub, cache)
    ctx = ChatContext(
        settings=settings,
        store=store,
        cache=cache,
        users=users,
        hub=hub,
        sockets=sockets,
        participant=participant,
        metrics=make_registry(cache, users, hub),
    )
    stop_watching = await watch_outcomes(settings, participant)
    app = make_app(
        settings,
        routes(),
        context=ctx,
        websocket_ping_interval=settings.chat_ws_ping_interval_s,
        websocket_ping_timeout=settings.chat_ws_ping_timeout_s,
        # Incoming frames over this close the socket (1009) before any JSON parsing; the
        # message length limit is enforced below it with an error frame. The gateway
        # derives the same limit from the same setting.
        websocket_max_message_size=chat_frame_bytes(settings.chat_max_message_chars),
    )
    revocations: Revocations | None = app.settings.get(REVOCATIONS)
    if revocations is not None:
        # A deleted or deactivated user's sockets close as soon as this instance hears of it.
        def close_revoked(user_id: int, mark: int) -> None:
            sockets.revoked(user_id, mark, CLOSE_UNAUTHENTICATED, "token revoked")

        revocations.listeners.append(close_revoked)

    async def close() -> None:
        await stop_watching()
        await hub.stop()
        await view.stop()
        await cache.close()
        await store.close()

    return ServiceApp(app=app, on_stop=[close], register_as="chat")
