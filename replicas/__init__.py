"""Read/write routing over a PostgreSQL primary and streaming replicas, with
read-your-writes across instances (a shared WAL high-water mark). See ``router``."""

from replicas.hwm import HighWaterMark, format_lsn
from replicas.router import Node, NoReadableNode, PrimaryUnavailable, ReadWriteRouter, is_node_failure, normalize_url

__all__ = [
    "HighWaterMark",
    "NoReadableNode",
    "Node",
    "PrimaryUnavailable",
    "ReadWriteRouter",
    "format_lsn",
    "is_node_failure",
    "normalize_url",
]
