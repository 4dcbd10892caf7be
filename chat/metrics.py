"""Prometheus metrics, read from the live counters at scrape time (no double bookkeeping)."""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from chat.cache import UserCache
from chat.fanout import Hub
from chat.users import UserDirectory


class ChatCollector:
    def __init__(self, cache: UserCache, users: UserDirectory, hub: Hub) -> None:
        self.cache = cache
        self.users = users
        self.hub = hub

    def collect(self) -> Iterator[Metric]:
        cache = self.cache.stats
        c = CounterMetricFamily("chat_user_cache_lookups", "User cache lookups by result", labels=["result"])
        c.add_metric(["hit"], cache.hits)
        c.add_metric(["miss"], cache.misses)
        c.add_metric(["error"], cache.errors)
        c.add_metric(["skipped"], cache.skipped)
        yield c
        yield CounterMetricFamily("chat_user_cache_stores", "Entries written to the user cache", value=cache.stores)
        yield CounterMetricFamily(
            "chat_user_cache_invalidations", "Entries removed from the user cache", value=cache.invalidations
        )
        users = self.users
        yield CounterMetricFamily("chat_authen_lookups", "User lookups sent to authen", value=users.authen_calls)
        yield CounterMetricFamily(
            "chat_authen_lookup_failures", "authen lookups that failed", value=users.authen_failures
        )
        f = self.hub.stats
        for name, help_, value in (
            ("chat_messages_stored", "Messages stored by this instance", f.stored),
            ("chat_messages_deduplicated", "Resent messages answered with the stored copy", f.deduplicated),
            ("chat_messages_published", "Messages published on Redis", f.published),
            ("chat_publish_failures", "Publishes that failed and were queued for retry", f.publish_failures),
            (
                "chat_publish_dropped",
                "Stored messages dropped from a full publish queue (read from MongoDB instead)",
                f.publish_dropped,
            ),
            ("chat_messages_received", "Messages received from Redis", f.received),
            ("chat_messages_delivered", "Message frames sent to sockets", f.delivered),
            ("chat_gap_filled", "Messages read from MongoDB to fill a seq gap", f.gap_filled),
            ("chat_gaps_skipped", "Seqs skipped as absent from MongoDB", f.gaps_skipped),
            ("chat_tail_recovered", "Messages delivered by a room's tail check", f.tail_recovered),
            ("chat_resyncs", "Rooms re-read after the pub/sub connection came back", f.resyncs),
            ("chat_slow_disconnects", "Sockets closed for not reading", f.slow_disconnects),
            ("chat_flood_rejections", "Messages refused by the flood guard", f.flood_rejections),
            ("chat_store_failures", "Messages that could not be stored", f.store_failures),
            ("chat_connections", "Sockets accepted", f.connections),
            ("chat_write_batches", "Batch inserts of messages", f.write_batches),
            ("chat_write_seconds", "Time spent in batch inserts", f.write_seconds),
        ):
            yield CounterMetricFamily(name, help_, value=value)
        yield GaugeMetricFamily("chat_loop_lag_max_ms", "Worst event-loop delay seen (ms)", value=f.loop_lag_max_ms)
        yield GaugeMetricFamily("chat_sockets", "Open chat sockets", value=self.hub.socket_count)
        yield GaugeMetricFamily("chat_rooms", "Chats with sockets on this instance", value=len(self.hub.rooms))
        yield GaugeMetricFamily("chat_write_queue", "Messages waiting to be stored", value=self.hub.writer.queued)
        yield GaugeMetricFamily(
            "chat_publish_backlog", "Stored messages waiting to be published", value=self.hub.bus.backlog
        )


def make_registry(cache: UserCache, users: UserDirectory, hub: Hub) -> CollectorRegistry:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(ChatCollector(cache, users, hub))
    return registry


def render(registry: CollectorRegistry) -> bytes:
    return generate_latest(registry)
