"""The fan-out's counters: one object shared by every part, read by /metrics and the status."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass
class FanoutStats:
    stored: int = 0
    deduplicated: int = 0
    published: int = 0
    publish_failures: int = 0
    # Stored messages dropped from a full publish queue while Redis was away; receivers
    # read them from MongoDB instead, later (gap fill or tail check).
    publish_dropped: int = 0
    received: int = 0
    delivered: int = 0
    gap_filled: int = 0
    gaps_skipped: int = 0
    tail_recovered: int = 0
    resyncs: int = 0
    slow_disconnects: int = 0
    flood_rejections: int = 0
    store_failures: int = 0
    connections: int = 0
    write_batches: int = 0
    write_seconds: float = 0.0
    # Worst event-loop delay seen (a 100 ms timer firing late), in ms: a busy or starved
    # process shows here before it shows anywhere else.
    loop_lag_max_ms: float = 0.0

    def as_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = dict(self.__dict__)
        out["write_seconds"] = round(self.write_seconds, 3)
        out["loop_lag_max_ms"] = round(self.loop_lag_max_ms, 1)
        return out
