"""magne.io.settle.Settlement: outcomes from the pool become frames on the consuming channel, copies go
through the engine's Sender.

The consuming channel is a real Outbox whose bytes are decoded with pamqp; the publishing link is a real
Sender on an unstarted Connection whose channels are marked open, so every case runs without a socket.
"""

from __future__ import annotations

import time
from collections import deque

import pytest
from pamqp import commands
from pamqp import frame as pframe

from magne import wire
from magne.amqp import codec
from magne.amqp.errors import ConnectionClosed, ConnectionLost
from magne.amqp.outbox import Outbox
from magne.amqp.protocol import ChannelPhase, Phase
from magne.amqp.url import Nodes, parse_url
from magne.delivery import Delivery, Outcome
from magne.engine.connection import Connection
from magne.engine.sender import ADMIN, MAX_CHARGES, PUB, Outgoing, Prep, Sender
from magne.io import settle
from magne.io.settle import Settlement
from magne.io.stats import Stats
from magne.policy import Failure, RetryPolicy, decide

Ack, Nack, Reject = commands.Basic.Ack, commands.Basic.Nack, commands.Basic.Reject


def frames_of(out: Outbox) -> list[tuple[int, object]]:
    """Everything written so far, decoded by pamqp (and taken out of the outbox)."""
    data = bytearray()

    def send(view: memoryview) -> int:
        data.extend(view)
        return len(view)

    out.flush(send)
    got = []
    pos = 0
    while pos < len(data):
        n, ch, f = pframe.unmarshal(bytes(data[pos:]))
        got.append((ch, f))
        pos += n
    return got


def settled(out: Outbox) -> list[tuple[str, int, bool]]:
    """The frames as (kind, tag, flag): ack's multiple, reject's requeue; nack as ('nack', tag, requeue)."""
    res = []
    for ch, f in frames_of(out):
        assert ch == settle.CH
        if isinstance(f, Ack):
            res.append(("ack", f.delivery_tag, f.multiple))
        elif isinstance(f, Reject):
            res.append(("reject", f.delivery_tag, f.requeue))
        elif isinstance(f, Nack):
            assert f.multiple is False
            res.append(("nack", f.delivery_tag, f.requeue))
        else:
            raise AssertionError(f"unexpected frame {f!r}")
    return res


class Broker:
    """A model of the broker's view of one channel's unacked tags: raises on what RabbitMQ answers with 406."""

    def __init__(self, n: int) -> None:
        self.unacked = set(range(1, n + 1))
        self.acked: set[int] = set()
        self.requeued: set[int] = set()

    def apply(self, events: list[tuple[str, int, bool]]) -> None:
        for kind, tag, flag in events:
            assert tag in self.unacked, f"{kind} of tag {tag}, which is not unacked (406)"
            if kind == "ack" and flag:
                covered = {t for t in self.unacked if t <= tag}
            else:
                covered = {tag}
            self.unacked -= covered
            (self.acked if kind == "ack" else self.requeued).update(covered)


def open_sender() -> tuple[Sender, Connection]:
    sender = Sender(Nodes([parse_url("amqp://127.0.0.1:1/")], start=0), "unit link", heartbeat=0)
    conn = sender.wire(Connection(sender.nodes.current, "unit link", heartbeat=0))
    p = conn.protocol
    p.phase = Phase.OPEN
    p._set(PUB, ChannelPhase.OPEN)
    p._set(ADMIN, ChannelPhase.OPEN)
    sender.conn, sender.ready = conn, True
    return sender, conn


def make(gen: int = 1) -> tuple[Settlement, Sender, Outbox, Stats, Connection]:
    sender, conn = open_sender()
    stats, out = Stats(), Outbox()
    s = Settlement(sender, stats, 131072)
    s.reset(gen, out)
    return s, sender, out, stats, conn


def answer(conn: Connection, channel: int, frame: object) -> None:
    """A frame from the broker, as the connection would dispatch it."""
    conn.protocol._dispatch_frame(channel, frame)


def published(conn: Connection) -> list[tuple[int, str, object]]:
    """What the sender wrote: (channel, kind, routing key or queue)."""
    out = []
    for ch, f in frames_of(conn.outbox):
        if isinstance(f, commands.Basic.Publish):
            out.append((ch, "publish", f.routing_key))
        elif isinstance(f, commands.Queue.Declare):
            out.append((ch, "declare", f.queue))
        elif isinstance(f, commands.Channel.Open | commands.Confirm.Select):
            out.append((ch, type(f).__name__, None))
    return out


def dl(tag: int, outcome: Outcome = Outcome.ACK, gen: int = 1, queue: str = "q") -> Delivery:
    d = Delivery(tag, gen, queue, b'{"func":"t"}', codec.header_payload(commands.Basic.Properties(message_id=f"m{tag}"), 12),
                 False)
    d.task = "t"
    d.outcome = outcome
    if outcome in (Outcome.RETRY, Outcome.DEAD):
        d.reason = "task raised"
        d.error = {"type": "ValueError", "message": "boom"}
        d.copy_to = "q.dead" if outcome is Outcome.DEAD else "q.wait.1000"
        d.copy_header = codec.header_payload(commands.Basic.Properties(
            delivery_mode=2, headers={"user": "u", wire.REASON: "task raised"}), len(d.body))
    return d


# -- acks -------------------------------------------------------------------------------------------------
def test_acks_are_coalesced_and_valid_for_the_broker():
    s, _link, out, stats, _conn = make()
    broker = Broker(8)
    assert s.drain(deque([dl(3), dl(1), dl(2), dl(5)]), 0.0) == 4
    events = settled(out)
    assert events == [("ack", 3, True), ("ack", 5, False)]
    broker.apply(events)
    s.drain(deque([dl(4), dl(7)]), 0.0)
    events = settled(out)
    assert events == [("ack", 4, True), ("ack", 7, False)]
    broker.apply(events)
    s.drain(deque([dl(8), dl(6)]), 0.0)
    events = settled(out)
    assert events == [("ack", 8, True)]
    broker.apply(events)
    assert broker.unacked == set() and broker.acked == set(range(1, 9))
    assert stats.acked == 8


def test_outcomes_of_an_old_generation_are_stale_and_write_nothing():
    s, _sender, out, stats, _conn = make(gen=2)
    assert s.drain(deque([dl(1, gen=1), dl(2, Outcome.GIVE_BACK, gen=1), dl(3, Outcome.DEAD, gen=1)]), 0.0) == 0
    assert stats.stale == 3 and not out and not s.unsent
    s.drain(deque([dl(1, gen=2)]), 0.0)
    assert settled(out) == [("ack", 1, True)]


def test_nothing_is_written_once_the_channel_is_closing():
    s, _link, out, stats, _conn = make()
    s.accepting = False
    s.drain(deque([dl(1), dl(2, Outcome.REQUEUE)]), 0.0)
    s.give_back([3])
    assert not out and stats.stale == 2 and stats.requeued == 0


def test_give_back_is_a_nack_and_requeue_is_a_reject():
    s, _link, out, stats, _conn = make()
    broker = Broker(4)
    s.drain(deque([dl(1, Outcome.GIVE_BACK), dl(2, Outcome.REQUEUE), dl(4), dl(3)]), 0.0)
    events = settled(out)
    assert events[:2] == [("nack", 1, True), ("reject", 2, True)]
    assert events[2:] == [("ack", 4, True)]  # 1 and 2 are settled: one multiple ack covers 3 and 4
    broker.apply(events)
    assert broker.requeued == {1, 2} and broker.acked == {3, 4}
    assert stats.requeued == 2
    s.give_back([5, 6])
    assert settled(out) == [("nack", 5, True), ("nack", 6, True)]


def test_nack_and_reject_frames_match_pamqp():
    s, _sender, out, _stats, _conn = make()
    s.drain(deque([dl(9, Outcome.GIVE_BACK), dl(10, Outcome.REQUEUE)]), 0.0)
    (_, nack), (_, reject) = frames_of(out)
    assert isinstance(nack, Nack) and (nack.delivery_tag, nack.multiple, nack.requeue) == (9, False, True)
    assert isinstance(reject, Reject) and (reject.delivery_tag, reject.requeue) == (10, True)


# -- copies -------------------------------------------------------------------------------------------------
def decided(tag: int, policy: RetryPolicy | None) -> Delivery:
    d = dl(tag)
    decide(d, Failure("task raised", ValueError("boom")), policy, 131072)
    return d


def test_a_copy_is_declared_then_published_and_acked_only_after_its_confirm():
    s, sender, out, stats, conn = make()
    d = decided(1, RetryPolicy(max_retries=3))
    s.drain(deque([d, dl(2)]), 0.0)
    assert settled(out) == [("ack", 2, False)]  # 1 is not settled yet: 2 goes singly
    sender.pump(0.0)
    assert published(conn) == [(ADMIN, "declare", d.copy_to)]  # its delay queue first, on its own channel
    answer(conn, ADMIN, commands.Queue.DeclareOk(d.copy_to, 0, 0))
    sender.pump(0.0)
    assert published(conn) == [(PUB, "publish", d.copy_to)] and s.pending_copies() == 1
    assert not out  # published, not confirmed: no ack
    sender._on_frame(PUB, Ack(delivery_tag=1, multiple=False))
    assert settled(out) == [("ack", 1, True)]
    assert stats.retried == 1 and stats.dead == 0 and stats.acked == 1  # the copy counts as retried, not acked


def test_a_refused_copy_is_never_acked_never_requeued_and_is_published_again_with_backoff():
    s, sender, out, stats, conn = make()
    d = dl(1, Outcome.DEAD)  # no declaration: published at once
    s.drain(deque([d]), 0.0)
    for n in range(1, 6):
        sender.pump(0.0)
        assert [k for _ch, k, _q in published(conn)] == ["publish"]
        sender._on_frame(PUB, Nack(delivery_tag=n, multiple=False))
        assert not out and d.blame == n and stats.copy_failures == n and stats.requeued == 0
        due = s.waiting[0][0]
        assert due > time.monotonic() - 1
        assert s.service(due - 0.001) == due and not sender.queue  # not before its backoff
        s.service(due)
    assert d.blame >= 2 and wire.DROPPED in (codec.decode_properties(d.copy_header).headers or {})
    sender.pump(0.0)
    sender._on_frame(PUB, Ack(delivery_tag=6, multiple=False))
    assert settled(out) == [("ack", 1, True)] and stats.dead == 1


def test_a_returned_copy_is_declared_again_once_and_is_never_an_ack():
    s, sender, out, stats, conn = make()
    d = decided(1, None)
    s.drain(deque([d]), 0.0)
    for seq in (1, 2):
        sender.pump(0.0)
        assert published(conn) == [(ADMIN, "declare", d.copy_to)]  # declared again after the first return
        answer(conn, ADMIN, commands.Queue.DeclareOk(d.copy_to, 0, 0))
        sender.pump(0.0)
        assert published(conn) == [(PUB, "publish", d.copy_to)]
        sender._on_return(PUB, commands.Basic.Return(312, "NO_ROUTE", "", d.copy_to), d.copy_header, d.body)
        sender._on_frame(PUB, Ack(delivery_tag=seq, multiple=False))  # the broker acks a returned message too
    assert not out and d.blame == 1 and len(s.waiting) == 1 and stats.copy_failures == 1


def test_nack_multiple_fails_exactly_what_it_covers():
    s, sender, out, _stats, conn = make()
    ds = [dl(t, Outcome.DEAD) for t in (1, 2, 3)]
    s.drain(deque(ds), 0.0)
    sender.pump(0.0)
    sender._on_frame(PUB, Nack(delivery_tag=2, multiple=True))
    assert not out and [d.blame for d in ds] == [1, 1, 0]
    sender._on_frame(PUB, Ack(delivery_tag=3, multiple=False))
    assert settled(out) == [("ack", 3, False)]


def test_a_new_generation_drops_old_copies_and_their_confirms_are_stale():
    s, sender, out, stats, conn = make(gen=1)
    on_wire, waiting = dl(1, Outcome.DEAD), dl(2, Outcome.DEAD)
    s.drain(deque([on_wire]), 0.0)
    sender.pump(0.0)
    s.drain(deque([waiting]), 0.0)
    new_out = Outbox()
    s.reset(2, new_out)
    assert not sender.queue and stats.stale == 1
    sender._on_frame(PUB, Ack(delivery_tag=1, multiple=False))
    assert stats.stale == 2 and not new_out and not out  # never acked on the new channel


# -- the sender's blame: only the message that caused a closure is charged ------------------------------------------
def msg(i: int, settled_with: list, preps: tuple[Prep, ...] = ()) -> Outgoing:
    return Outgoing("", f"q{i}", codec.header_payload(commands.Basic.Properties(message_id=f"m{i}"), 1), b"x",
                    f"m{i}", preps, done=lambda m, e: settled_with.append((m.message_id, e)))


def test_a_closed_publish_channel_charges_nobody_until_a_message_closes_it_alone():
    sender, conn = open_sender()
    got: list = []
    for i in range(3):
        sender.put(msg(i, got))
    sender.pump(0.0)
    assert [q for _c, k, q in published(conn) if k == "publish"] == ["q0", "q1", "q2"]
    answer(conn, PUB, commands.Channel.Close(406, "PRECONDITION_FAILED - message size", 60, 40))
    assert not got and len(sender.queue) == 3 and all(m.charged == 0 for m in sender.queue)
    answer(conn, PUB, commands.Channel.OpenOk())
    answer(conn, PUB, commands.Confirm.SelectOk())
    sender.pump(0.0)
    assert [q for _c, k, q in published(conn) if k == "publish"] == ["q0"]  # one at a time now
    sender._on_frame(PUB, Ack(delivery_tag=1))
    assert [q for _c, k, q in published(conn) if k == "publish"] == ["q1"]
    for attempt in range(MAX_CHARGES):  # q1 closes the channel while alone: it, and only it, is charged
        answer(conn, PUB, commands.Channel.Close(406, "PRECONDITION_FAILED", 60, 40))
        answer(conn, PUB, commands.Channel.OpenOk())
        answer(conn, PUB, commands.Confirm.SelectOk())
        sender.pump(0.0)
        if attempt < MAX_CHARGES - 1:
            assert [q for _c, k, q in published(conn) if k == "publish"] == ["q1"]
            sender.tracker.seq = 0  # the channel numbers from 1 again
    assert got[0][0] == "m0" and got[0][1] is None
    assert got[1][0] == "m1" and "406" in str(got[1][1])
    assert [q for _c, k, q in published(conn) if k == "publish"] == ["q2"]
    sender._on_frame(PUB, Ack(delivery_tag=1))
    assert got[2] == ("m2", None)


def test_a_refused_declaration_fails_only_the_messages_that_needed_it():
    sender, conn = open_sender()
    got: list = []
    check = Prep(("check", "missing"), [(commands.Queue.Declare(queue="missing", passive=True),
                                         commands.Queue.DeclareOk)], passive=True, what="missing")
    healthy = Prep(("declare", "ok"), [(commands.Queue.Declare(queue="ok"), commands.Queue.DeclareOk)], what="ok")
    sender.put(msg(0, got, (check,)))
    sender.put(msg(1, got, (check,)))
    sender.pump(0.0)
    assert published(conn) == [(ADMIN, "declare", "missing")]
    answer(conn, ADMIN, commands.Channel.Close(404, "NOT_FOUND - no queue 'missing'", 50, 10))
    assert [(m, type(e).__name__) for m, e in got] == [("m0", "NoSuchQueue"), ("m1", "NoSuchQueue")]
    sender.put(msg(2, got, (healthy,)))
    answer(conn, ADMIN, commands.Channel.OpenOk())
    sender.pump(0.0)
    assert [k for _c, k, _q in published(conn)] == ["Open", "declare"]
    answer(conn, ADMIN, commands.Queue.DeclareOk("ok", 0, 0))
    sender.pump(0.0)
    sender._on_frame(PUB, Ack(delivery_tag=1))
    assert got[2] == ("m2", None)


@pytest.mark.parametrize("exc", [ConnectionLost("reset"), ConnectionClosed(320, "CONNECTION_FORCED")])
def test_a_lost_connection_charges_nobody_and_keeps_the_order(exc):
    sender, conn = open_sender()
    got: list = []
    for i in range(3):
        sender.put(msg(i, got))
    sender.pump(0.0)
    sender.failed(exc, 1.0)
    assert not got and [m.message_id for m in sender.queue] == ["m0", "m1", "m2"]
    assert all(m.charged == 0 for m in sender.queue) and not sender.suspects and sender.conn is None


def test_settling_errors_are_contained_to_their_message():
    s, _sender, out, stats, _conn = make()
    bad_error = dl(2, Outcome.RETRY)
    bad_error.error = "not a dict"  # type: ignore[assignment]  # copy() formats it: AttributeError

    class Exploding(Delivery):
        __slots__ = ()

        @property  # type: ignore[override]
        def outcome(self):
            raise RuntimeError("outcome unreadable")

        @outcome.setter
        def outcome(self, _v):
            pass

    exploding = Exploding(4, 1, "q", b"", b"\xff\xff", False)
    garbage = dl(5)
    garbage.outcome = "bogus"  # type: ignore[assignment]
    n = s.drain(deque([dl(1), bad_error, dl(3), exploding, garbage, dl(6)]), 0.0)
    assert n == 6
    events = settled(out)
    broker = Broker(6)
    broker.apply(events)
    assert broker.acked == {1, 3, 6}
    assert broker.requeued == {2, 4, 5}
    assert ("reject", 2, True) in events and ("reject", 4, True) in events  # errors count as a delivery
    assert not s.unsent and stats.requeued == 3


