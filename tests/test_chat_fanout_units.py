"""chat's fan-out logic without the stack: a room's ordering and gap fill, a socket's
catch-up, the writer's batching and seq allocation, the bus's queue and parsing.

Each part is driven over small in-memory fakes of the interfaces it declares
(chat.fanout.rooms.RoomStore, chat.fanout.writer.WriteStore, ...); nothing here talks
to MongoDB or Redis.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any

import pytest

from chat.chats import CLOSE_NOT_FOUND
from chat.fanout.bus import Bus
from chat.fanout.rooms import Room
from chat.fanout.stats import FanoutStats
from chat.fanout.subscriptions import CLOSE_TOO_SLOW, Delivery, Subscription
from chat.fanout.writer import Writer
from chat.store import Chat, ChatMessage, InsertOutcome, StoreUnavailable
from chat.users import User
from common.errors import BadRequest, Conflict
from tests.util import wait_until

# The marker is registered in pyproject by the test-infrastructure change; until then
# pytest warns that it is unknown, which is harmless.
pytestmark = pytest.mark.unit

CHAT = "c1"
UNSTORABLE = "\x00unstorable"
ALICE = User(id=1, username="alice", first_name="Alice", last_name="A", type="customer")


def doc(chat_id: str, seq: int, _id: str | None = None, text: str | None = None) -> dict[str, Any]:
    return {
        "_id": _id or f"{chat_id}-{seq}",
        "chat_id": chat_id,
        "seq": seq,
        "message": text or f"m{seq}",
        "sender": {"id": 1, "first_name": "Alice", "last_name": "A"},
        "sent_at": "2026-01-01T00:00:00.000Z",
        "created_at": 1.0,
    }


def msg(seq: int, chat_id: str = CHAT) -> ChatMessage:
    return ChatMessage.from_doc(doc(chat_id, seq))


class FakeStore:
    """In-memory messages with the unique indexes of chat.store: ``_id`` and (chat_id, seq)."""

    def __init__(self, chats: tuple[str, ...] = (CHAT,)) -> None:
        self.docs: dict[str, dict[str, Any]] = {}
        self.chats: dict[str, Chat] = {c: Chat(c, 1, 2, 0.0) for c in chats}
        self.inserts: list[list[dict[str, Any]]] = []
        self.reads = 0
        # The next this many calls fail as if MongoDB were away.
        self.failures = 0
        # Store the next insert, then fail as if its reply were lost.
        self.lose_reply = False
        # While set, inserts wait on it (a batch in flight).
        self.gate: asyncio.Event | None = None
        self.deleted_ids: list[str] = []

    def put(self, d: dict[str, Any]) -> None:
        self.docs[d["_id"]] = dict(d)

    def _maybe_fail(self) -> None:
        if self.failures > 0:
            self.failures -= 1
            raise StoreUnavailable("mongodb away")

    def _taken(self, d: dict[str, Any]) -> bool:
        return d["_id"] in self.docs or any(
            o["chat_id"] == d["chat_id"] and o["seq"] == d["seq"] for o in self.docs.values()
        )

    async def messages_after(self, chat_id: str, after: int, limit: int, upto: int | None = None) -> list[ChatMessage]:
        self.reads += 1
        self._maybe_fail()
        found = sorted(
            (
                d
                for d in self.docs.values()
                if d["chat_id"] == chat_id and d["seq"] > after and (upto is None or d["seq"] <= upto)
            ),
            key=lambda d: d["seq"],
        )
        return [ChatMessage.from_doc(d) for d in found[:limit]]

    async def max_seq(self, chat_id: str) -> int:
        self._maybe_fail()
        return max((d["seq"] for d in self.docs.values() if d["chat_id"] == chat_id), default=0)

    async def get_chat(self, chat_id: str) -> Chat | None:
        self._maybe_fail()
        return self.chats.get(chat_id)

    async def insert_messages(self, docs: list[dict[str, Any]]) -> list[InsertOutcome]:
        self.inserts.append([dict(d) for d in docs])
        await asyncio.sleep(0)  # a round trip: other tasks run meanwhile, as with MongoDB
        if self.gate is not None:
            await self.gate.wait()
        self._maybe_fail()
        outcomes: list[InsertOutcome] = []
        for d in docs:
            if d["message"] == UNSTORABLE:
                outcomes.append(InsertOutcome(invalid=True, error="is not encodable"))
            elif self._taken(d):
                outcomes.append(InsertOutcome(duplicate=True, error="duplicate key"))
            else:
                self.put(d)
                outcomes.append(InsertOutcome(ok=True))
        if self.lose_reply:
            self.lose_reply = False
            raise StoreUnavailable("reply lost")
        return outcomes

    async def existing_chats(self, chat_ids: set[str]) -> set[str]:
        self._maybe_fail()
        return chat_ids & set(self.chats)

    async def delete_messages(self, message_ids: list[str]) -> None:
        self._maybe_fail()
        for mid in message_ids:
            self.docs.pop(mid, None)
        self.deleted_ids.extend(message_ids)

    async def message_by_id(self, mid: str) -> ChatMessage | None:
        self._maybe_fail()
        d = self.docs.get(mid)
        return ChatMessage.from_doc(d) if d is not None else None

    def seqs(self, chat_id: str = CHAT) -> list[int]:
        return sorted(d["seq"] for d in self.docs.values() if d["chat_id"] == chat_id)


class Recorder:
    """A room member that records what the room delivers to it."""

    def __init__(self) -> None:
        self.seqs: list[int] = []
        self.closed_with: tuple[int, str] | None = None

    def offer(self, m: ChatMessage) -> None:
        self.seqs.append(m.seq)

    def close(self, code: int, reason: str) -> None:
        self.closed_with = (code, reason)


async def open_room(
    store: FakeStore, gap_skip_s: float = 5.0, chat_id: str = CHAT
) -> tuple[Room, Recorder, FanoutStats]:
    stats = FanoutStats()
    room = Room(Chat(chat_id, 1, 2, 0.0), store, stats, gap_skip_s)
    member = Recorder()
    room.subs.add(member)
    await room.init()
    return room, member, stats


# -- rooms: order, duplicates, gaps ------------------------------------------------------
async def test_room_delivers_in_seq_order_each_seq_once() -> None:
    store = FakeStore()
    room, member, _ = await open_room(store)
    for seq in (1, 1, 2, 1, 3, 2):
        room.accept(msg(seq))
    assert member.seqs == [1, 2, 3]
    assert room.delivered == 3 and not room.pending


async def test_room_holds_a_message_ahead_until_the_missing_one_arrives() -> None:
    store = FakeStore()
    room, member, _ = await open_room(store)
    room.accept(msg(1))
    room.accept(msg(3))
    room.accept(msg(4))
    assert member.seqs == [1]
    assert sorted(room.pending) == [3, 4]
    room.accept(msg(2))  # the late publish arrives before the fill found anything
    assert member.seqs == [1, 2, 3, 4]
    assert not room.pending


async def test_room_fills_a_gap_from_storage() -> None:
    store = FakeStore()
    for seq in (1, 2, 3):
        store.put(doc(CHAT, seq))
    room, member, stats = await open_room(store)
    assert room.delivered == 3  # opened at the stored end: nothing replayed to the room
    for seq in (4, 5, 6):
        store.put(doc(CHAT, seq))
    room.accept(msg(6))  # the publishes of 4 and 5 were lost
    await wait_until(lambda: room.delivered == 6, timeout=5, message="the gap filled")
    assert member.seqs == [4, 5, 6]
    assert stats.gap_filled == 2
    assert stats.gaps_skipped == 0


async def test_room_gap_fill_survives_storage_failures() -> None:
    store = FakeStore()
    room, member, stats = await open_room(store)
    store.put(doc(CHAT, 1))
    store.put(doc(CHAT, 2))
    store.failures = 2
    room.accept(msg(2))
    await wait_until(lambda: room.delivered == 2, timeout=5, message="the gap filled after the failures")
    assert member.seqs == [1, 2]
    assert stats.gap_filled == 1 and store.failures == 0


async def test_room_skips_a_seq_absent_from_storage_for_the_skip_time() -> None:
    store = FakeStore()
    room, member, stats = await open_room(store, gap_skip_s=0.2)
    room.accept(msg(1))
    room.accept(msg(4))  # 2 and 3 were never stored (their writer died)
    await asyncio.sleep(0)
    assert member.seqs == [1]
    await wait_until(lambda: room.delivered == 4, timeout=5, message="the gap skipped")
    assert member.seqs == [1, 4]
    assert stats.gaps_skipped == 2
    # The skipped seqs break the in-memory run: a socket behind it reads from storage.
    assert room.recent_after(1) == []
    assert [m.seq for m in room.recent_after(3)] == [4]
    # A skipped seq that turns up after all is not delivered out of order.
    room.accept(msg(3))
    assert member.seqs == [1, 4]


async def test_room_holds_messages_published_while_it_opens() -> None:
    store = FakeStore()
    for seq in (1, 2, 3):
        store.put(doc(CHAT, seq))
    stats = FanoutStats()
    room = Room(Chat(CHAT, 1, 2, 0.0), store, stats, 5.0)
    member = Recorder()
    room.subs.add(member)
    room.receive(msg(3))  # stored before the room reads the chat's end: counted in it
    room.receive(msg(4))  # stored after: delivered once the room knows where it stands
    assert len(room.early) == 2 and member.seqs == []
    await room.init()
    assert room.ready.done() and room.early == []
    assert member.seqs == [4] and room.delivered == 4
    room.receive(msg(5))
    assert member.seqs == [4, 5]


async def test_room_learns_a_deletion_when_it_opens() -> None:
    store = FakeStore()
    store.chats[CHAT] = Chat(CHAT, 1, 2, 0.0, deleting="gid-1")
    room, _, _ = await open_room(store)
    assert room.refused == "chat is being deleted"
    del store.chats[CHAT]
    room2, _, _ = await open_room(store)
    assert room2.refused == "chat deleted"


async def test_room_that_cannot_open_releases_its_joiners() -> None:
    store = FakeStore()
    store.failures = 1
    room, _, _ = await open_room(store)
    assert room.ready.done() and isinstance(room.ready.exception(), StoreUnavailable)
    assert not room.is_open


async def test_room_tail_check_delivers_what_pubsub_never_brought() -> None:
    store = FakeStore()
    room, member, stats = await open_room(store)
    for seq in range(1, 451):  # more than one page
        store.put(doc(CHAT, seq))
    room.needs_check = True
    await room.check_tail()
    assert member.seqs == list(range(1, 451))
    assert stats.tail_recovered == 450 and not room.needs_check


async def test_room_next_seq_follows_what_is_known_stored() -> None:
    store = FakeStore()
    room, _, _ = await open_room(store)
    assert room.next_seq() == 1
    room.accept(msg(1))
    assert room.next_seq() == 2
    room.accept(msg(5))  # held, but known to exist
    assert room.next_seq() == 6


async def test_room_close_closes_every_member_and_takes_no_more() -> None:
    store = FakeStore()
    room, member, _ = await open_room(store)
    room.close(4409, "chat is being deleted")
    room.closed = True
    assert member.closed_with == (4409, "chat is being deleted")
    room.accept(msg(1))
    assert member.seqs == [] and not room.subs


# -- subscriptions: catch-up, then live, at the client's pace ----------------------------
class FakeTransport:
    """A socket whose client takes its backlog only when told to."""

    def __init__(self, max_buffer_bytes: int) -> None:
        self.frames: list[int] = []
        self.buffered = 0
        self.low_water = max_buffer_bytes // 2
        self.closed_with: tuple[int, str] | None = None
        self.waiting = False
        self._taken = asyncio.Event()

    def send_frame(self, text: str, nbytes: int) -> None:
        self.frames.append(json.loads(text)["seq"])
        self.buffered += nbytes

    @property
    def buffered_bytes(self) -> int:
        return self.buffered

    async def drain(self, timeout: float) -> bool:
        if self.buffered > self.low_water:
            self._taken.clear()
            self.waiting = True
            try:
                await asyncio.wait_for(self._taken.wait(), timeout)
            except TimeoutError:
                return False
            finally:
                self.waiting = False
        return not self.is_closed

    def take_all(self) -> None:
        self.buffered = 0
        self._taken.set()

    def close_with(self, code: int, reason: str) -> None:
        self.closed_with = (code, reason)

    @property
    def is_closed(self) -> bool:
        return self.closed_with is not None


async def test_subscription_catches_up_from_storage_or_the_room_then_goes_live() -> None:
    store = FakeStore()
    for seq in range(1, 301):
        store.put(doc(CHAT, seq))
    room, _, stats = await open_room(store)
    room.subs.clear()
    for seq in range(301, 311):  # the room's recent messages
        store.put(doc(CHAT, seq))
        room.accept(msg(seq))
    delivery = Delivery(store, stats, 10**9, 1.0)
    transport = FakeTransport(10**9)
    sub = Subscription(room, transport, ALICE, 0, delivery)
    room.subs.add(sub)
    sub.start_catch_up()
    await wait_until(lambda: sub.live, timeout=5, message="the subscription live")
    assert store.reads == 2  # two pages from storage: the room's run does not reach back to 1
    room.accept(msg(311))
    assert transport.frames == list(range(1, 312))
    # A socket whose cursor is within the room's run catches up without reading storage.
    near = FakeTransport(10**9)
    sub2 = Subscription(room, near, ALICE, 305, delivery)
    room.subs.add(sub2)
    sub2.start_catch_up()
    await wait_until(lambda: sub2.live, timeout=5, message="the second subscription live")
    assert near.frames == list(range(306, 312)) and store.reads == 2
    assert stats.delivered == 311 + 6


async def test_subscription_over_its_buffer_is_paced_then_dropped_when_it_takes_nothing() -> None:
    store = FakeStore()
    room, _, stats = await open_room(store)
    room.subs.clear()
    limit = 3 * msg(1).frame_bytes
    transport = FakeTransport(limit)
    sub = Subscription(room, transport, ALICE, 0, Delivery(store, stats, limit, 0.3))
    room.subs.add(sub)
    sub.start_catch_up()
    await wait_until(lambda: sub.live, timeout=5, message="the subscription live")
    for seq in range(1, 7):
        room.accept(msg(seq))
    # Three frames fit; the fourth waits for the client to take its backlog.
    assert transport.frames == [1, 2, 3] and not sub.live
    await wait_until(lambda: transport.waiting, timeout=5, message="the replay waiting for the client")
    assert transport.frames == [1, 2, 3]
    transport.take_all()
    await wait_until(lambda: sub.live, timeout=5, message="live again after the paced replay")
    assert transport.frames == [1, 2, 3, 4, 5, 6] and transport.closed_with is None
    # It never takes the rest: after the send timeout it is disconnected.
    for seq in range(7, 12):
        room.accept(msg(seq))
    await wait_until(lambda: transport.closed_with is not None, timeout=5, message="the slow client dropped")
    assert transport.closed_with is not None and transport.closed_with[0] == CLOSE_TOO_SLOW
    assert transport.frames == [1, 2, 3, 4, 5, 6]
    assert stats.slow_disconnects == 1 and sub.closed


# -- the writer: batches, seqs, retries ---------------------------------------------------
class FakeTarget:
    """The chat a message is written to: seqs follow what it knows is stored."""

    def __init__(self, chat_id: str) -> None:
        self.chat_id = chat_id
        self.known_max = 0
        self.refused: str | None = None
        self.accepted: list[int] = []

    def next_seq(self) -> int:
        return max([self.known_max, *self.accepted]) + 1

    def accept(self, m: ChatMessage) -> None:
        self.accepted.append(m.seq)


class WriterRig:
    def __init__(self, store: FakeStore, batch_max: int = 500, write_timeout_s: float = 10.0) -> None:
        self.store = store
        self.stats = FanoutStats()
        self.published: list[list[int]] = []
        self.closed: list[tuple[str, int, str]] = []
        self.writer = Writer(
            store,
            self.stats,
            lambda ms: self.published.append([m.seq for m in ms]),
            lambda chat_id, code, reason: self.closed.append((chat_id, code, reason)),
            batch_max,
            write_timeout_s,
        )

    def submit(self, target: FakeTarget, text: str, _id: str) -> asyncio.Task[ChatMessage]:
        d = {
            "_id": _id,
            "chat_id": target.chat_id,
            "message": text,
            "sender": {"id": 1, "first_name": "Alice", "last_name": "A"},
            "sent_at": "2026-01-01T00:00:00.000Z",
            "created_at": 1.0,
        }
        return asyncio.ensure_future(self.writer.submit(target, d))


@pytest.fixture
async def rig_store() -> AsyncIterator[tuple[WriterRig, FakeStore]]:
    store = FakeStore(chats=("a", "b", "c"))
    rig = WriterRig(store)
    rig.writer.start()
    yield rig, store
    await rig.writer.stop()


async def test_writer_batches_across_chats_one_message_per_chat(rig_store: tuple[WriterRig, FakeStore]) -> None:
    rig, store = rig_store
    a, b, c = FakeTarget("a"), FakeTarget("b"), FakeTarget("c")
    store.gate = asyncio.Event()
    first = rig.submit(a, "a1", "a1")
    await wait_until(lambda: len(store.inserts) == 1, timeout=5, message="the first batch in flight")
    # While it is in flight the next batch gathers: the second message of chat a waits
    # for its first to be stored; b and c ride along.
    rest = [rig.submit(a, "a2", "a2"), rig.submit(b, "b1", "b1"), rig.submit(c, "c1", "c1"), rig.submit(a, "a3", "a3")]
    await asyncio.sleep(0)
    assert rig.writer.queued == 5
    store.gate.set()
    done = await asyncio.wait_for(asyncio.gather(first, *rest), 5)
    assert [[d["_id"] for d in batch] for batch in store.inserts] == [["a1"], ["b1", "c1", "a2"], ["a3"]]
    assert [(m.chat_id, m.seq) for m in done] == [("a", 1), ("a", 2), ("b", 1), ("c", 1), ("a", 3)]
    assert a.accepted == [1, 2, 3] and b.accepted == [1] and c.accepted == [1]
    assert rig.published == [[1], [1, 1, 2], [3]]
    assert rig.stats.stored == 5 and rig.stats.write_batches == 3 and rig.writer.queued == 0


async def test_writer_respects_the_batch_size() -> None:
    store = FakeStore(chats=("a", "b", "c"))
    rig = WriterRig(store, batch_max=2)
    rig.writer.start()
    try:
        store.gate = asyncio.Event()
        targets = [FakeTarget(x) for x in "abc"]
        tasks = [rig.submit(t, t.chat_id, t.chat_id) for t in targets]
        await asyncio.sleep(0)
        store.gate.set()
        await asyncio.wait_for(asyncio.gather(*tasks), 5)
        assert [len(batch) for batch in store.inserts] == [2, 1]
    finally:
        await rig.writer.stop()


async def test_writer_takes_the_next_seq_after_another_writer_took_one(rig_store: tuple[WriterRig, FakeStore]) -> None:
    rig, store = rig_store
    a = FakeTarget("a")
    store.put(doc("a", 1, _id="other-instance"))  # stored elsewhere, not yet heard of here
    stored = await asyncio.wait_for(rig.submit(a, "hello", "mine"), 5)
    assert stored.seq == 2
    assert [d["seq"] for d in (batch[0] for batch in store.inserts)] == [1, 2]
    assert a.known_max == 2 and store.seqs("a") == [1, 2]
    assert rig.stats.deduplicated == 0


async def test_writer_answers_a_resend_with_the_stored_copy(rig_store: tuple[WriterRig, FakeStore]) -> None:
    rig, store = rig_store
    a = FakeTarget("a")
    store.put(doc("a", 1, _id="a:1:client-7", text="hello"))
    stored = await asyncio.wait_for(rig.submit(a, "hello", "a:1:client-7"), 5)
    assert (stored.seq, stored.public["message"]) == (1, "hello")
    assert store.seqs("a") == [1] and rig.stats.deduplicated == 1
    # Everyone gets it again (the first publish may have been lost); receivers drop repeats.
    assert rig.published == [[1]] and a.accepted == [1]


async def test_writer_retries_a_lost_reply_with_the_same_id_and_seq(rig_store: tuple[WriterRig, FakeStore]) -> None:
    rig, store = rig_store
    a = FakeTarget("a")
    store.lose_reply = True  # stored, but the writer hears only an error
    stored = await asyncio.wait_for(rig.submit(a, "hello", "x1"), 5)
    assert stored.seq == 1
    assert [(batch[0]["_id"], batch[0]["seq"]) for batch in store.inserts] == [("x1", 1), ("x1", 1)]
    assert store.seqs("a") == [1] and rig.stats.deduplicated == 1 and rig.stats.store_failures == 0


async def test_writer_retries_while_storage_is_away_then_gives_up() -> None:
    store = FakeStore(chats=("a",))
    rig = WriterRig(store, write_timeout_s=1.0)
    rig.writer.start()
    try:
        store.failures = 2
        ok = await asyncio.wait_for(rig.submit(FakeTarget("a"), "hello", "x1"), 5)
        assert ok.seq == 1 and len(store.inserts) == 3
        store.failures = 10**6
        with pytest.raises(StoreUnavailable):
            await asyncio.wait_for(rig.submit(FakeTarget("a"), "later", "x2"), 5)
        assert rig.stats.store_failures == 1
    finally:
        await rig.writer.stop()


async def test_writer_refuses_an_unstorable_message_without_taking_its_seq(
    rig_store: tuple[WriterRig, FakeStore],
) -> None:
    rig, store = rig_store
    a = FakeTarget("a")
    with pytest.raises(BadRequest):
        await asyncio.wait_for(rig.submit(a, UNSTORABLE, "bad"), 5)
    ok = await asyncio.wait_for(rig.submit(a, "fine", "good"), 5)
    assert ok.seq == 1 and store.seqs("a") == [1]


async def test_writer_refuses_messages_of_a_chat_being_deleted(rig_store: tuple[WriterRig, FakeStore]) -> None:
    rig, store = rig_store
    a = FakeTarget("a")
    a.refused = "chat is being deleted"
    with pytest.raises(Conflict):
        await asyncio.wait_for(rig.submit(a, "hello", "x1"), 5)
    assert store.inserts == [] and rig.published == []


async def test_writer_removes_what_landed_in_a_chat_deleted_meanwhile(rig_store: tuple[WriterRig, FakeStore]) -> None:
    rig, store = rig_store
    a, b = FakeTarget("a"), FakeTarget("b")
    del store.chats["a"]  # deleted by another instance; this one did not hear of it yet
    gone, kept = rig.submit(a, "hello", "x1"), rig.submit(b, "hi", "y1")
    with pytest.raises(Conflict):
        await asyncio.wait_for(gone, 5)
    assert (await asyncio.wait_for(kept, 5)).seq == 1
    assert store.deleted_ids == ["x1"] and store.seqs("a") == []
    assert rig.closed == [("a", CLOSE_NOT_FOUND, "chat deleted")]
    assert rig.published == [[1]] and a.accepted == []


async def test_writer_stop_fails_what_is_still_queued() -> None:
    store = FakeStore(chats=("a",))
    rig = WriterRig(store)
    rig.writer.start()
    store.gate = asyncio.Event()
    pending = rig.submit(FakeTarget("a"), "hello", "x1")
    await wait_until(lambda: store.inserts, timeout=5, message="the batch in flight")
    await rig.writer.stop()
    with pytest.raises(StoreUnavailable):
        await asyncio.wait_for(pending, 5)


# -- the bus: its queue and what it hands on ----------------------------------------------
class Listener:
    def __init__(self) -> None:
        self.published: list[int] = []
        self.controls: list[dict[str, Any]] = []
        self.resubscribed = 0

    def on_published(self, m: ChatMessage) -> None:
        self.published.append(m.seq)

    def on_control(self, control: dict[str, Any]) -> None:
        self.controls.append(control)

    def on_resubscribed(self) -> None:
        self.resubscribed += 1


async def test_bus_counts_what_a_full_publish_queue_drops() -> None:
    stats = FanoutStats()
    # Never started: no connection is made, the queue only fills.
    bus = Bus("redis://127.0.0.1:1/0", Listener(), stats, outbox_max=3)
    bus.publish([msg(s) for s in range(1, 6)])
    assert bus.backlog == 3 and stats.publish_dropped == 2
    assert stats.as_dict()["publish_dropped"] == 2
    await bus.stop()


async def test_bus_hands_on_other_instances_messages_and_skips_its_own() -> None:
    listener = Listener()
    bus = Bus("redis://127.0.0.1:1/0", listener, FanoutStats())
    bus.handle({"type": "subscribe", "data": 1})
    assert bus.connected and listener.resubscribed == 0
    other = b"someoneelse\n" + b"\n".join(
        [
            msg(1).frame.encode(),
            b"{not json",
            msg(2).frame.encode(),
            json.dumps({"control": True, "action": "close_chat"}).encode(),
        ]
    )
    bus.handle({"type": "message", "data": other})
    bus.handle({"type": "message", "data": bus.instance_id.encode() + b"\n" + msg(3).frame.encode()})
    assert listener.published == [1, 2]
    assert listener.controls == [{"control": True, "action": "close_chat"}]
    # Subscribed again after a lost connection: whatever was published meanwhile is missed.
    bus.handle({"type": "subscribe", "data": 1})
    assert listener.resubscribed == 1
    await bus.stop()
