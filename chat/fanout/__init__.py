"""Real-time fan-out: store first, then publish; the database is the source of truth.

One room (:mod:`.rooms`) per chat that has sockets on this instance. A message is stored
in MongoDB (by the writer, :mod:`.writer`, which gives it the chat's next ``seq``),
delivered to this instance's sockets at once, and published on Redis (:mod:`.bus`) so
the other instances deliver it to theirs. Every room delivers in ``seq`` order, each seq
once, filling gaps from MongoDB and skipping a seq confirmed absent for
``CHAT_GAP_SKIP_S``; a room with no delivery for ``CHAT_TAIL_CHECK_S`` (and every room
after the pub/sub connection came back) re-reads its tail from MongoDB, which delivers a
message whose publisher died, or whose publish is still waiting for Redis, without
waiting for a later message to reveal the gap.

Each socket (:mod:`.subscriptions`) keeps its own cursor: it catches up from ``since``
at the client's pace, then goes live; one that takes nothing for
``CHAT_WS_SEND_TIMEOUT_S`` is disconnected (4408).

The hub (:mod:`.hub`) wires them; every other part depends only on the narrow
interfaces declared beside it (``BusListener``, ``Feed``/``MessageReader``,
``RoomStore``/``Member``, ``WriteStore``/``Target`` and two callables), and all of them
count into one :class:`FanoutStats`.
"""

from chat.fanout.bus import FANOUT_CHANNEL, Bus
from chat.fanout.hub import CLOSE_GOING_AWAY, Hub, HubConfig
from chat.fanout.rooms import Room
from chat.fanout.stats import FanoutStats
from chat.fanout.subscriptions import CLOSE_TOO_SLOW, CLOSE_UNAVAILABLE, Subscription, Transport
from chat.fanout.writer import Writer

__all__ = [
    "CLOSE_GOING_AWAY",
    "CLOSE_TOO_SLOW",
    "CLOSE_UNAVAILABLE",
    "FANOUT_CHANNEL",
    "Bus",
    "FanoutStats",
    "Hub",
    "HubConfig",
    "Room",
    "Subscription",
    "Transport",
    "Writer",
]
