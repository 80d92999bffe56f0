"""magne.io.settle.Settlement: outcomes from the pool become frames on the consuming channel.

The consuming channel is a real Outbox whose bytes are decoded with pamqp; the
publishing link is a fake (or a real PublishLink on an unstarted Connection), so
every case runs without a socket.
"""

from __future__ import annotations

import time
from collections import deque

import pytest
from pamqp import commands
from pamqp import frame as pframe

from magne import wire
from magne.amqp import codec
from magne.amqp.errors import ChannelClosed, ConnectionClosed, ConnectionLost
from magne.amqp.outbox import Outbox
from magne.amqp.url import Nodes, parse_url
from magne.delivery import Delivery, Outcome
from magne.engine.connection import Connection
from magne.io import settle
from magne.io.link import PublishLink
from magne.io.settle import MAX_BLAME, Settlement
from magne.io.stats import Stats
from magne.policy import Failure, RetryPolicy, decide

Ack, Nack, Reject = commands.Basic.Ack, commands.Basic.Nack, commands.Basic.Reject


class FakeLink:
    """What Settlement uses of PublishLink: open/ready, publish, confirms, fail."""

    def __init__(self) -> None:
        self.on_confirm = None
        self.confirms: dict[int, tuple[Delivery, float]] = {}
        self.is_open = True
        self.ready = True
        self.published: list[Delivery] = []
        self.seq = 0
        self.opens = 0

    def open(self, now: float) -> None:
        self.opens += 1
        self.is_open = True

    def publish(self, d: Delivery, now: float) -> None:
        self.seq += 1
        self.confirms[self.seq] = (d, now)
        self.published.append(d)

    def fail(self) -> list[Delivery]:
        pending = [d for d, _ in self.confirms.values()]
        self.confirms.clear()
        return pending

    def confirm(self, d: Delivery, ok: bool = True) -> None:
        seq = next(s for s, (x, _) in self.confirms.items() if x is d)
        del self.confirms[seq]
        self.on_confirm(d, ok, "" if ok else "refused by the broker (basic.nack)")


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


def make(gen: int = 1) -> tuple[Settlement, FakeLink, Outbox, Stats]:
    link, stats, out = FakeLink(), Stats(), Outbox()
    s = Settlement(link, stats)  # type: ignore[arg-type]
    s.reset(gen, out)
    return s, link, out, stats


def dl(tag: int, outcome: Outcome = Outcome.ACK, gen: int = 1, queue: str = "q") -> Delivery:
    d = Delivery(tag, gen, queue, b'{"func":"t"}', codec.header_payload(commands.Basic.Properties(message_id=f"m{tag}"), 12),
                 False)
    d.task = "t"
    d.outcome = outcome
    if outcome in (Outcome.RETRY, Outcome.DEAD):
        d.reason = "task raised"
        d.error = {"type": "ValueError", "message": "boom"}
        d.copy_to = "q.dead" if outcome is Outcome.DEAD else "q.delay.1000"
        d.copy_header = codec.header_payload(commands.Basic.Properties(
            delivery_mode=2, headers={"user": "u", wire.REASON: "task raised"}), len(d.body))
    return d


# -- acks -------------------------------------------------------------------------------------------------
def test_acks_are_coalesced_and_valid_for_the_broker():
    s, _link, out, stats = make()
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
    s, _link, out, stats = make(gen=2)
    assert s.drain(deque([dl(1, gen=1), dl(2, Outcome.GIVE_BACK, gen=1), dl(3, Outcome.DEAD, gen=1)]), 0.0) == 0
    assert stats.stale == 3 and not out and not s.unsent
    s.drain(deque([dl(1, gen=2)]), 0.0)
    assert settled(out) == [("ack", 1, True)]


def test_nothing_is_written_once_the_channel_is_closing():
    s, _link, out, stats = make()
    s.accepting = False
    s.drain(deque([dl(1), dl(2, Outcome.REQUEUE)]), 0.0)
    s.give_back([3])
    assert not out and stats.stale == 2 and stats.requeued == 0


def test_give_back_is_a_nack_and_requeue_is_a_reject():
    s, _link, out, stats = make()
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
    s, _link, out, _stats = make()
    s.drain(deque([dl(9, Outcome.GIVE_BACK), dl(10, Outcome.REQUEUE)]), 0.0)
    (_, nack), (_, reject) = frames_of(out)
    assert isinstance(nack, Nack) and (nack.delivery_tag, nack.multiple, nack.requeue) == (9, False, True)
    assert isinstance(reject, Reject) and (reject.delivery_tag, reject.requeue) == (10, True)


# -- copies -------------------------------------------------------------------------------------------------
def test_a_copy_is_acked_only_after_its_confirm():
    s, link, out, stats = make()
    d = dl(1, Outcome.RETRY)
    s.drain(deque([d, dl(2)]), 0.0)
    assert settled(out) == [("ack", 2, False)]  # 1 is not settled yet: 2 goes singly
    assert list(s.unsent) == [d] and s.pending_copies() == 1
    assert s.service(0.0) is None
    assert link.published == [d] and not s.unsent and s.pending_copies() == 1
    assert not out  # published, not confirmed: no ack
    link.confirm(d, ok=True)
    assert settled(out) == [("ack", 1, True)]
    assert stats.retried == 1 and stats.dead == 0 and stats.acked == 1  # the copy counts as retried, not acked
    dead = dl(3, Outcome.DEAD)
    s.drain(deque([dead]), 0.0)
    s.service(0.0)
    link.confirm(dead, ok=True)
    assert settled(out) == [("ack", 3, True)] and stats.dead == 1


def test_a_refused_copy_is_never_acked_and_is_published_again():
    s, link, out, stats = make()
    d = dl(1, Outcome.DEAD)
    s.drain(deque([d]), 0.0)
    s.service(0.0)
    link.confirm(d, ok=False)
    assert not out
    assert list(s.unsent) == [d] and d.blame == 1 and stats.copy_failures == 1
    assert s.retry_at > time.monotonic()
    # not before the backoff
    assert s.service(time.monotonic()) == s.retry_at and link.published == [d]
    s.service(s.retry_at)
    assert link.published == [d, d]
    link.confirm(d, ok=True)
    assert settled(out) == [("ack", 1, True)]


def test_a_copy_refused_max_blame_times_requeues_the_original():
    s, link, out, stats = make()
    d = dl(1, Outcome.RETRY)
    s.drain(deque([d]), 0.0)
    for i in range(MAX_BLAME):
        s.service(s.retry_at)
        assert len(link.published) == i + 1
        link.confirm(d, ok=False)
        if i < MAX_BLAME - 1:
            assert not out
    assert settled(out) == [("reject", 1, True)]
    assert not s.unsent and stats.requeued == 1
    assert s.service(s.retry_at + 100) is None and len(link.published) == MAX_BLAME


def test_copy_failures_count_each_refusal_once():
    s, link, _out, stats = make()
    d = dl(1, Outcome.RETRY)
    s.drain(deque([d]), 0.0)
    for _ in range(MAX_BLAME):
        s.service(s.retry_at)
        link.confirm(d, ok=False)
    assert stats.copy_failures == MAX_BLAME


def test_link_failure_blames_the_oldest_copy_and_gives_up_after_max_blame():
    s, link, out, stats = make()
    d1, d2, d3 = dl(1, Outcome.DEAD), dl(2, Outcome.RETRY), dl(3, Outcome.DEAD)
    s.drain(deque([d1, d2, d3]), 0.0)
    s.service(0.0)
    assert link.published == [d1, d2, d3]
    refused = ChannelClosed(1, 406, "PRECONDITION_FAILED - inequivalent arg")
    rounds = 0
    while d1.blame < MAX_BLAME:
        rounds += 1
        assert rounds <= MAX_BLAME, "the link keeps failing on the same copy: no end"
        s.link_failed(refused, 10.0 * rounds)
        assert d2.blame == 0 and d3.blame == 0
        if d1.blame < MAX_BLAME:
            assert list(s.unsent) == [d1, d2, d3]
            assert s.retry_at > 10.0 * rounds
            link.published.clear()
            s.service(s.retry_at)
            assert link.published == [d1]  # a suspect copy goes alone
        if d1.blame >= 2:
            headers = codec.decode_properties(d1.copy_header).headers
            assert "user" not in headers and wire.DROPPED in headers and headers[wire.REASON] == "task raised"
    assert settled(out) == [("reject", 1, True)]  # given up: the original goes back to its queue
    assert list(s.unsent) == [d2, d3] and stats.copy_failures == 1
    link.published.clear()
    s.service(s.retry_at)
    assert link.published == [d2, d3]
    link.confirm(d2)
    link.confirm(d3)
    assert settled(out) == [("ack", 2, True), ("ack", 3, True)]


def test_a_lost_link_blames_nobody():
    s, link, out, _stats = make()
    d1, d2 = dl(1, Outcome.DEAD), dl(2, Outcome.DEAD)
    s.drain(deque([d1, d2]), 0.0)
    s.service(0.0)
    s.link_failed(ConnectionLost("reset"), 1.0)
    assert d1.blame == 0 and list(s.unsent) == [d1, d2] and not out
    s.service(s.retry_at)
    assert link.published[-2:] == [d1, d2]


def test_connection_closed_also_blames():
    s, link, _out, _stats = make()
    d1 = dl(1, Outcome.DEAD)
    s.drain(deque([d1]), 0.0)
    s.service(0.0)
    s.link_failed(ConnectionClosed(541, "INTERNAL_ERROR"), 1.0)
    assert d1.blame == 1


def test_a_new_generation_drops_old_copies_and_their_confirms_are_stale():
    s, link, out, stats = make(gen=1)
    published, waiting = dl(1, Outcome.DEAD), dl(2, Outcome.DEAD)
    s.drain(deque([published]), 0.0)
    s.service(0.0)
    s.drain(deque([waiting]), 0.0)
    new_out = Outbox()
    s.reset(2, new_out)
    assert not s.unsent and stats.stale == 1
    link.confirm(published, ok=True)
    assert stats.stale == 2 and not new_out and not out  # never acked on the new channel


def test_settling_errors_are_contained_to_their_message():
    s, _link, out, stats = make()
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


# -- with the real PublishLink --------------------------------------------------------------------------------
def real_link() -> tuple[Settlement, PublishLink, Outbox, Stats, Connection]:
    link = PublishLink(Nodes([parse_url("amqp://127.0.0.1:1/")]), "unit link", lambda *_: None)
    stats, out = Stats(), Outbox()
    s = Settlement(link, stats)
    s.reset(1, out)
    conn = Connection(link.nodes.current, "unit link", heartbeat=0)
    link.conn, link.ready = conn, True
    return s, link, out, stats, conn


def decided(tag: int, policy: RetryPolicy | None) -> Delivery:
    d = dl(tag)
    decide(d, Failure("task raised", ValueError("boom")), policy, 131072)
    return d


def test_real_link_confirm_acks_the_original():
    s, link, out, stats, conn = real_link()
    d = decided(1, RetryPolicy(max_retries=3))
    s.drain(deque([d]), 0.0)
    s.service(0.0)
    written = frames_of(conn.outbox)
    kinds = [type(f).__name__ for _, f in written]
    assert kinds == ["Declare", "Publish", "ContentHeader", "ContentBody"]  # the delay queue first
    assert written[1][1].routing_key == d.copy_to and written[1][1].mandatory is True
    assert not out
    link._on_frame(1, Ack(delivery_tag=1, multiple=False))
    assert settled(out) == [("ack", 1, True)] and stats.retried == 1


def test_real_link_returned_copy_is_not_an_ack():
    s, link, out, stats, conn = real_link()
    d = decided(1, None)
    s.drain(deque([d]), 0.0)
    s.service(0.0)
    link._on_return(1, commands.Basic.Return(312, "NO_ROUTE", "", d.copy_to), b"", b"")
    link._on_frame(1, Ack(delivery_tag=1, multiple=False))  # the broker acks a returned message too
    assert not out and d.blame == 1 and list(s.unsent) == [d] and stats.copy_failures == 1


def test_real_link_nack_multiple():
    s, link, out, _stats, conn = real_link()
    ds = [decided(t, None) for t in (1, 2, 3)]
    s.drain(deque(ds), 0.0)
    s.service(0.0)
    link._on_frame(1, Nack(delivery_tag=2, multiple=True))
    assert not out and [d.blame for d in ds] == [1, 1, 0]
    link._on_frame(1, Ack(delivery_tag=3, multiple=False))
    assert settled(out) == [("ack", 3, False)]


@pytest.mark.parametrize("exc", [ChannelClosed(1, 406, "x"), ConnectionLost("y")])
def test_real_link_fail_returns_unconfirmed_copies(exc):
    s, link, _out, _stats, _conn = real_link()
    ds = [decided(t, None) for t in (1, 2)]
    s.drain(deque(ds), 0.0)
    s.service(0.0)
    s.link_failed(exc, 1.0)
    assert list(s.unsent) == ds and link.conn is None and not link.confirms
    assert ds[0].blame == (1 if isinstance(exc, ChannelClosed) else 0)
