"""chat's configuration: every value an environment variable whose default fits the local stack."""

from __future__ import annotations

from pydantic import Field

from common.config import ServiceSettings


class ChatSettings(ServiceSettings):
    port: int = 8201
    mongo_url: str = "mongodb://127.0.0.1:27018/"
    chat_mongo_db: str = "chat"
    # Comma-separated host:port seeds of the Redis Cluster holding the user cache.
    redis_cluster_nodes: str = (
        "127.0.0.1:17001,127.0.0.1:17002,127.0.0.1:17003,127.0.0.1:17004,127.0.0.1:17005,127.0.0.1:17006"
    )
    # Public base URL of the gateway: ws_url values handed to clients point there.
    gateway_public_url: str = "http://127.0.0.1:8000"

    # -- user cache -------------------------------------------------------------------
    user_cache_ttl_s: int = Field(3600, ge=1)
    # One cache round trip may take at most this long; past it the lookup goes to authen.
    user_cache_timeout_s: float = Field(0.25, gt=0)
    # After a cache error, skip the cache for this long (no added latency while it is down).
    user_cache_cooldown_s: float = Field(1.0, ge=0)
    authen_timeout_s: float = Field(3.0, gt=0)

    # -- socket protocol --------------------------------------------------------------
    chat_max_message_chars: int = Field(4000, ge=1)
    chat_replay_last: int = Field(50, ge=0)
    chat_flood_rate_per_s: float = Field(20.0, gt=0)
    chat_flood_burst: int = Field(40, ge=1)
    # Bytes queued for one socket but not yet taken by the kernel; over this the client
    # is too slow and is disconnected.
    chat_ws_max_buffer_bytes: int = Field(1024 * 1024, ge=64 * 1024)
    # SO_SNDBUF of each socket (0: the kernel's autotuning). A small value bounds the kernel
    # memory a non-reading client can pin, and makes such a client visible sooner.
    chat_ws_sndbuf_bytes: int = Field(0, ge=0)
    # A replay waits this long for a client to take its backlog before giving up on it.
    chat_ws_send_timeout_s: float = Field(10.0, gt=0)
    # Sockets one user may hold open on one chat instance; past it a new one is closed
    # with 4429 at once.
    chat_max_sockets_per_user: int = Field(20, ge=1)
    chat_ws_ping_interval_s: float = Field(20.0, gt=0)
    # No pong within this (at most the interval) closes the socket.
    chat_ws_ping_timeout_s: float = Field(15.0, gt=0)

    # -- fan-out ----------------------------------------------------------------------
    # A room with no delivery for this long re-reads its tail from MongoDB (a message
    # stored by an instance that died before publishing it still reaches everyone).
    chat_tail_check_s: float = Field(5.0, gt=0)
    # A seq missing from MongoDB while later ones exist is waited for this long, then skipped.
    chat_gap_skip_s: float = Field(3.0, gt=0)
    chat_write_batch_max: int = Field(500, ge=1)
