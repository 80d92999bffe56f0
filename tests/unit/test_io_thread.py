"""The real I/O thread (magne.io.loop.IOThread) on its own thread, against scripted peers.

No broker: tests/unit/peer.py listens on loopback and every connection the I/O thread
makes (the consuming connection, its reconnects, the publishing link, all to the same
address) is accepted as a Peer of its own, which the test thread scripts frame by frame.
A `SimpleQueue` stands in for the pool: the test takes deliveries from it and hands
outcomes back with `io.report()`, as the pool's threads do.

Backoff jitter is pinned to its lower bound (`fast_backoff`) so reconnects and
re-consumes happen at known times; the first reconnect after a working connection
is a fixed 0.2 s in magne.io.loop.
"""

from __future__ import annotations

import errno
import gc
import socket
import time
import types
from collections.abc import Callable
from queue import Empty, SimpleQueue
from typing import Any

import pytest
from pamqp import body as pbody
from pamqp import commands
from pamqp import frame as pframe
from pamqp import header as pheader
from pamqp import heartbeat as pheartbeat
from peer import Peer, PeerTimeout

import magne.backoff
import magne.engine.transport
from magne.amqp.url import parse_url
from magne.delivery import Delivery, Outcome
from magne.io.loop import IOThread
from magne.policy import Failure, decide

Heartbeat = pheartbeat.Heartbeat


# -- the rig ---------------------------------------------------------------------------------------------
class Rig:
    """One listening peer, the connections magne made to it, the I/O thread and its work queue."""

    def __init__(self) -> None:
        self.peer = Peer(backlog=8)
        self.conns: list[Peer] = []
        self.work: SimpleQueue[Delivery | None] = SimpleQueue()
        self.io: IOThread | None = None

    def start(self, queues: tuple[str, ...] = ("A",), prefetch: int = 10, **url: Any) -> IOThread:
        self.io = IOThread(parse_url(self.peer.url(**url)), list(queues), prefetch, self.work)
        self.io.start()
        return self.io

    def accept(self, timeout: float = 2.0) -> Peer:
        c = self.peer.accept_peer(timeout)
        self.conns.append(c)
        return c

    def take(self, n: int, timeout: float = 2.0) -> list[Delivery]:
        out = []
        for _ in range(n):
            d = self.work.get(timeout=timeout)
            assert d is not None
            out.append(d)
        return out

    def close(self) -> None:
        if self.io is not None:
            self.io.request_stop(force=True)
        for c in self.conns:
            c.close()
        self.peer.close()
        if self.io is not None:
            self.io.finished.wait(5)


@pytest.fixture
def rig():
    r = Rig()
    yield r
    r.close()
    assert r.io is None or r.io.finished.is_set(), "the I/O thread did not end after a forced stop and its sockets closing"


@pytest.fixture(autouse=True)
def fast_backoff(monkeypatch):
    """Backoff delays at their lower bound (no jitter): re-consume after 0.5 s, reconnect attempts 0.5 s apart."""
    monkeypatch.setattr(magne.backoff, "random", types.SimpleNamespace(uniform=lambda a, b: a))


# -- scripting a broker --------------------------------------------------------------------------------
def handshake(c: Peer, heartbeat: int = 60, frame_max: int = 131072) -> commands.Connection.StartOk:
    """Connection start / tune / open, then open-ok. Returns magne's start-ok (its connection_name tells who it is)."""
    start_ok = c.start()
    c.tune(heartbeat=heartbeat, frame_max=frame_max)
    c.send(commands.Connection.OpenOk())
    return start_ok


def name_of(start_ok: commands.Connection.StartOk) -> str:
    return start_ok.client_properties["connection_name"]


def read_setup(c: Peer, queues: tuple[str, ...], prefetch: int = 10) -> dict[str, str]:
    """Take magne through its channel setup: channel 1 and qos, then for each queue its declarations on the probe
    channel (2), the consume on channel 1 and the probe channel's close, checking every frame. The consume-oks are
    not sent (answer_setup does). Returns queue -> consumer tag."""
    c.expect(commands.Channel.Open, channel=1)
    qos = c.expect(commands.Basic.Qos, channel=1)
    assert (qos.prefetch_count, qos.global_) == (prefetch, False)
    c.send(commands.Channel.OpenOk(), commands.Basic.QosOk(), channel=1)
    ctags = {}
    for q in queues:
        c.expect(commands.Channel.Open, channel=2)
        ex = c.expect(commands.Exchange.Declare, channel=2)
        assert (ex.exchange, ex.exchange_type, ex.durable) == (q, "direct", True)
        qd = c.expect(commands.Queue.Declare, channel=2)
        assert (qd.queue, qd.durable) == (q, True)
        bind = c.expect(commands.Queue.Bind, channel=2)
        assert (bind.queue, bind.exchange, bind.routing_key) == (q, q, q)
        due = c.expect(commands.Queue.Declare, channel=2)
        assert (due.queue, due.durable) == (f"{q}.due", True)
        dead = c.expect(commands.Queue.Declare, channel=2)
        assert (dead.queue, dead.durable) == (f"{q}.dead", True)
        c.send(*probe_replies(q), channel=2)
        for physical in (q, f"{q}.due"):  # the task queue and its due queue, both consumed as the queue
            consume = c.expect(commands.Basic.Consume, channel=1)
            assert consume.queue == physical and not consume.no_ack and not consume.exclusive
            ctags[physical] = consume.consumer_tag
        c.expect(commands.Channel.Close, channel=2)
        c.send(commands.Channel.CloseOk(), channel=2)
    assert len(set(ctags.values())) == 2 * len(queues), f"consumer tags are not distinct: {ctags}"
    return ctags


def probe_replies(q: str) -> list[Any]:
    """The answers to one queue's declarations on the probe channel."""
    return [commands.Channel.OpenOk(), commands.Exchange.DeclareOk(), commands.Queue.DeclareOk(q, 0, 0),
            commands.Queue.BindOk(), commands.Queue.DeclareOk(f"{q}.due", 0, 0), commands.Queue.DeclareOk(f"{q}.dead", 0, 0)]


def consume_oks(ctags: dict[str, str], *queues: str) -> list[Any]:
    """The consume-oks of each queue's two consumers (the queue's and its due queue's)."""
    return [commands.Basic.ConsumeOk(ctags[name]) for q in queues for name in (q, f"{q}.due")]


def answer_setup(c: Peer, queues: tuple[str, ...], ctags: dict[str, str]) -> None:
    c.send(*consume_oks(ctags, *queues), channel=1)


def open_consuming(rig: Rig, queues: tuple[str, ...] = ("A",), prefetch: int = 10, heartbeat: int = 60,
                   ) -> tuple[Peer, dict[str, str]]:
    """Accept the next consuming connection and take it through handshake and setup."""
    c = rig.accept()
    start_ok = handshake(c, heartbeat=heartbeat)
    assert name_of(start_ok).startswith("magne worker ["), name_of(start_ok)
    ctags = read_setup(c, queues, prefetch)
    answer_setup(c, queues, ctags)
    return c, ctags


def _deliver_bytes(ctag: str, tag: int, body: bytes = b"{}", queue: str = "A", redelivered: bool = False) -> bytes:
    return b"".join([
        pframe.marshal(commands.Basic.Deliver(ctag, tag, redelivered, queue, queue), 1),
        pframe.marshal(pheader.ContentHeader(0, len(body), commands.Basic.Properties(message_id=f"m-{tag}")), 1),
        pframe.marshal(pbody.ContentBody(body), 1),
    ])


def deliver(c: Peer, ctag: str, tag: int, body: bytes = b"{}", queue: str = "A", redelivered: bool = False) -> None:
    c.send_raw(_deliver_bytes(ctag, tag, body, queue, redelivered))


def next_method(c: Peer, timeout: float = 2.0) -> tuple[int, Any]:
    """The next frame magne wrote that is not a heartbeat."""
    while True:
        ch, f = c.read_frame(timeout)
        if not isinstance(f, Heartbeat):
            return ch, f


def quiet(c: Peer, seconds: float) -> list[tuple[int, Any]]:
    """Every non-heartbeat frame magne writes within `seconds` (the test usually wants none)."""
    got = []
    deadline = time.monotonic() + seconds
    while (left := deadline - time.monotonic()) > 0:
        try:
            ch, f = c.read_frame(left)
        except PeerTimeout:
            break
        if not isinstance(f, Heartbeat):
            got.append((ch, f))
    return got


def wait_for(cond: Callable[[], bool], timeout: float = 2.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} not reached within {timeout}s")
        time.sleep(0.005)


def report_batch(io: IOThread, ds: list[Delivery]) -> None:
    """Hand back several outcomes so that one drain sees them all (report() wakes the I/O thread once per batch)."""
    io.outcomes.extend(ds[:-1])
    io.report(ds[-1])


def ack_of(f: Any) -> tuple[int, bool]:
    assert isinstance(f, commands.Basic.Ack), f"expected basic.ack, got {f!r}"
    return f.delivery_tag, f.multiple


def make_dead(d: Delivery) -> Delivery:
    decide(d, Failure("task raised", RuntimeError("boom")), None, 131072)
    assert d.outcome is Outcome.DEAD and d.copy_to == f"{d.queue}.dead"
    return d


# -- 1. setup ------------------------------------------------------------------------------------------------
def test_setup_is_pipelined_and_ready_after_every_consume_ok(rig):
    """After open-ok: channel.open and qos on channel 1, then each queue's declarations (pipelined) on the
    probe channel, its consume on channel 1, the probe channel closed; `ready` waits for the last consume-ok.

    Catches: a missing or reordered declaration, declarations on the consuming channel (a 404 there would
    drop every queue), global or wrong prefetch, no_ack consumes, ready set too early (e.g. on the first
    consume-ok or on channel.open-ok).
    """
    queues = ("A", "B", "C")
    io = rig.start(queues, prefetch=7)
    c = rig.accept()
    handshake(c)
    ctags = read_setup(c, queues, prefetch=7)
    assert not io.ready.is_set()
    c.send(*consume_oks(ctags, "A", "B"), channel=1)
    assert not io.ready.wait(0.3), "ready before the last consume-ok"
    assert quiet(c, 0.0) == []
    c.send(*consume_oks(ctags, "C"), channel=1)
    assert io.ready.wait(2), "not ready after every consume-ok"
    assert io.failed is None and io.stats.reconnects == 0


# -- 2. deliveries and acks -------------------------------------------------------------------------------
def test_deliveries_reach_the_pool_and_acks_coalesce(rig):
    """Deliveries land in the work queue with their queue, tag, body and redelivered flag; ACK outcomes become
    basic.ack frames: a finished prefix is one multiple ack, a tag above a gap is acked singly at once, and the
    tag filling the gap is never covered by a multiple ack of a tag already acked.

    Catches: deliveries mapped to the wrong queue (consumer tag lookup), lost bodies, no coalescing (three
    single acks), held-back acks above a gap, a multiple ack re-acking an acked tag (406 on a real broker).
    """
    io = rig.start(("A", "B"))
    c, ctags = open_consuming(rig, ("A", "B"))
    assert io.ready.wait(2)
    for tag, q in [(1, "A"), (2, "B"), (3, "A"), (4, "B"), (5, "A")]:
        deliver(c, ctags[q], tag, body=f'{{"n": {tag}}}'.encode(), queue=q, redelivered=tag == 4)
    ds = rig.take(5)
    assert [(d.queue, d.tag, d.body, d.redelivered) for d in ds] == [
        ("A", 1, b'{"n": 1}', False), ("B", 2, b'{"n": 2}', False), ("A", 3, b'{"n": 3}', False),
        ("B", 4, b'{"n": 4}', True), ("A", 5, b'{"n": 5}', False)]
    assert quiet(c, 0.2) == [], "something was settled before any outcome"

    report_batch(io, ds[:3])
    assert ack_of(next_method(c)[1]) == (3, True)
    io.report(ds[4])
    assert ack_of(next_method(c)[1]) == (5, False)
    io.report(ds[3])
    assert ack_of(next_method(c)[1]) == (4, True)  # covers 4 only: 5 was acked already
    assert quiet(c, 0.2) == []
    assert (io.stats.delivered, io.stats.acked, io.stats.redelivered) == (5, 5, 1)


# -- 3. reconnects and delivery generations -----------------------------------------------------------------
def test_reconnect_failing_between_consumes_leaves_no_stale_delivery(rig):
    """A reconnect that dies between two consume-oks, after a delivery on the first queue: once the next
    connection is consuming, the work queue holds nothing of the dead one.

    Catches: deliveries of a half-set-up connection left in the work queue when it fails (lost() not emptying
    this generation, or a failure during setup taking another path); the pool would run such a message, its
    ack would be dropped as stale, and the broker would redeliver it: a duplicate run.
    """
    io = rig.start(("A", "B"))
    c1, _ = open_consuming(rig, ("A", "B"))
    assert io.ready.wait(2)
    c1.close()  # connection 1 lost; reconnect in 0.2 s

    c2 = rig.accept()
    handshake(c2)
    ctags = read_setup(c2, ("A", "B"))
    c2.send(*consume_oks(ctags, "A"), channel=1)
    deliver(c2, ctags["A"], 1, b'{"from": "connection 2"}')
    time.sleep(0.1)  # the I/O thread reads the delivery before the end of the stream
    c2.close()  # before B's consume-ok

    c3, ctags3 = open_consuming(rig, ("A", "B"))
    wait_for(lambda: io.stats.reconnects == 1, what="consuming again on connection 3")
    assert io.stats.delivered == 1, "the delivery on connection 2 never reached magne: the test proves nothing"
    with pytest.raises(Empty):
        stale = rig.work.get_nowait()
        pytest.fail(f"a delivery of the dead connection is still in the work queue: {stale!r}")
    deliver(c3, ctags3["A"], 1, b'{"from": "connection 3"}', redelivered=True)
    (d,) = rig.take(1)
    assert d.body == b'{"from": "connection 3"}'
    io.report(d)
    assert ack_of(next_method(c3)[1]) == (1, True)


def test_outcome_of_an_old_connection_is_not_written_on_the_new_channel(rig):
    """A task that was running when its connection died reports ACK after the reconnect: nothing is written on
    the new channel (tag 1 there is another message), and it is counted in stats.stale.

    Catches: outcomes settled by tag without checking their generation (design invariant 4): the new channel
    would ack a message nobody ran, or the broker would close it with 406 unknown delivery tag.
    """
    io = rig.start(("A",))
    c1, ctags = open_consuming(rig)
    assert io.ready.wait(2)
    deliver(c1, ctags["A"], 1)
    (old,) = rig.take(1)  # running in the "pool"
    c1.close()

    c2, ctags2 = open_consuming(rig)
    wait_for(lambda: io.stats.reconnects == 1, what="consuming again")
    deliver(c2, ctags2["A"], 1, redelivered=True)
    (new,) = rig.take(1)
    io.report(old)
    wait_for(lambda: io.stats.stale == 1, what="the old outcome counted as stale")
    assert quiet(c2, 0.2) == [], "the old generation's outcome was written on the new channel"
    io.report(new)
    assert ack_of(next_method(c2)[1]) == (1, True)
    assert quiet(c2, 0.2) == []


# -- 4, 5. the publishing link --------------------------------------------------------------------------------
def test_unsent_copy_of_an_old_generation_is_not_published_after_reconnect(rig):
    """A DEAD outcome waits for a link whose peer does not answer; the consuming connection drops and comes back;
    when the link finally opens, the old copy is not published (its original comes back redelivered).

    Catches: Settlement.reset keeping copies of an older generation in `unsent`: the copy would be published and
    then, once confirmed, its original could never be acked (stale): a duplicate dead letter per reconnect.
    """
    io = rig.start(("A",), connection_timeout=5000)
    c1, ctags = open_consuming(rig)
    assert io.ready.wait(2)
    deliver(c1, ctags["A"], 1)
    (d,) = rig.take(1)
    io.report(make_dead(d))
    link = rig.accept()  # the link connects for the copy; its peer stays silent for now
    c1.close()

    c2, _ = open_consuming(rig)
    wait_for(lambda: io.stats.reconnects == 1, what="consuming again")
    start_ok = link.start()
    assert name_of(start_ok).startswith("magne worker publisher ["), name_of(start_ok)
    tune_ok, _open = link.tune(heartbeat=60)
    assert tune_ok.heartbeat == 0  # the link has no heartbeats
    link.send(commands.Connection.OpenOk())
    link.expect(commands.Channel.Open, channel=1)
    link.send(commands.Channel.OpenOk(), channel=1)
    link.expect(commands.Confirm.Select, channel=1)
    link.send(commands.Confirm.SelectOk(), channel=1)
    link.expect(commands.Channel.Open, channel=2)  # the declarations' own channel
    link.send(commands.Channel.OpenOk(), channel=2)
    wait_for(lambda: io.link.ready, what="the link ready")
    assert quiet(link, 0.5) == [], "a copy of the old generation was published"
    assert quiet(c2, 0.0) == []
    assert io.stats.stale >= 1 and io.stats.dead == 0


def test_a_silent_link_never_delays_acks_or_heartbeats(rig):
    """While a DEAD copy waits on a link that accepted TCP but never answers AMQP, ACK outcomes of other
    deliveries are written within 100 ms each, heartbeats keep flowing, and the DEAD original stays unacked.

    Catches: the I/O thread blocking on the link (a blocking connect or handshake, a wait for its confirm),
    acks queued behind the copy, or the copy's original acked before its copy is confirmed.
    """
    io = rig.start(("A",), heartbeat=1)
    c, ctags = open_consuming(rig, heartbeat=1)
    assert io.ready.wait(2)
    for tag in range(1, 5):
        deliver(c, ctags["A"], tag)
    ds = rig.take(4)
    io.report(make_dead(ds[0]))
    link = rig.accept()  # never answered
    c.heartbeat()

    delays = []
    for d in ds[1:]:
        time.sleep(0.2)
        c.heartbeat()
        t0 = time.monotonic()
        io.report(d)
        _ch, f = next_method(c, 1.0)
        delays.append(time.monotonic() - t0)
        assert ack_of(f) == (d.tag, False)  # tag 1 is not settled: no multiple ack may cover it
    assert max(delays) < 0.1, f"acks took {[round(x, 3) for x in delays]}s to be written"

    # Idle (nothing to ack): heartbeats every hb/2 keep the consuming connection alive.
    beats = []
    t0 = time.monotonic()
    while time.monotonic() - t0 < 1.05:
        c.heartbeat()
        try:
            ch, f = c.read_frame(0.3)
        except PeerTimeout:
            continue
        assert isinstance(f, Heartbeat) and ch == 0, f"unexpected {f!r}"
        beats.append(time.monotonic())
    assert len(beats) >= 2, f"{len(beats)} heartbeats in 1.05 s idle with heartbeat=1"
    link.poll()
    assert bytes(link.buf) == b"AMQP\x00\x00\x09\x01" and not link.eof  # the link is still waiting, not given up
    assert io.stats.acked == 3 and io.stats.dead == 0 and not c.eof


# -- 6. a stalled consuming socket ---------------------------------------------------------------------------
def test_stalled_socket_costs_no_cpu_and_is_lost_after_two_heartbeats(rig):
    """The peer stops reading and writing while magne has acks to write (its socket full, its outbox not empty):
    the I/O thread idles (process CPU well under a second over ~1.7 s), declares the connection lost after
    2 x heartbeat of silence, and reconnects.

    Catches: a busy loop on a full socket (writable interest spinning, timers that return a wake-up in the
    past), heartbeats queued behind bytes the socket does not take (the outbox growing), a missed-heartbeat
    check that never fires while the outbox is not empty, or one that fires early.
    """
    rig.peer.close()
    rig.peer = Peer(rcvbuf=4096, backlog=8)  # accepted sockets inherit it: magne's acks fill the path quickly
    io = rig.start(("A",), prefetch=0, heartbeat=1)
    c, ctags = open_consuming(rig, prefetch=0, heartbeat=1)
    assert io.ready.wait(2)
    conn = io.consumer.conn
    assert conn is not None and conn.sock is not None
    conn.sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)  # a small kernel buffer on magne's side too
    n = 3000
    c.send_raw(b"".join(_deliver_bytes(ctags["A"], tag) for tag in range(1, n + 1)))
    ds = rig.take(n)
    last_word = time.monotonic()  # from here the peer neither reads nor writes
    report_batch(io, ds[1:])  # tag 1 never finishes: every other tag is a single 21-byte ack
    wait_for(lambda: io.consumer.conn is conn and conn.outbox.size > 0, 1.0, "magne's outbox backing up")

    backlog = conn.outbox.size
    cpu0, t0 = time.process_time(), time.monotonic()
    time.sleep(1.7 - (t0 - last_word))
    cpu = time.process_time() - cpu0
    assert io.consumer.conn is conn and conn.outbox.size > 0, "the socket never stalled: the test proves nothing"
    assert cpu < 0.3, f"{cpu:.2f}s of CPU in {time.monotonic() - t0:.2f}s on a stalled socket"
    assert conn.outbox.size <= backlog, f"the outbox grew from {backlog} to {conn.outbox.size} bytes on a stalled socket"

    c2 = rig.accept(3.0)
    lost_after = time.monotonic() - last_word
    assert 1.9 < lost_after < 2.8, f"reconnected {lost_after:.2f}s after the peer went silent (heartbeat=1)"
    handshake(c2, heartbeat=1)
    answer_setup(c2, ("A",), read_setup(c2, ("A",), prefetch=0))
    wait_for(lambda: io.stats.reconnects == 1, what="consuming again")
    assert io.stats.stale == 0 and io.stats.acked == n - 1


# -- 7. basic.cancel from the broker ---------------------------------------------------------------------------
def _probe_frames(c: Peer, queue: str) -> None:
    """The re-declaration of a cancelled queue on channel 2: open, then its five declarations, pipelined."""
    c.expect(commands.Channel.Open, channel=2)
    assert c.expect(commands.Exchange.Declare, channel=2).exchange == queue
    assert c.expect(commands.Queue.Declare, channel=2).queue == queue
    assert c.expect(commands.Queue.Bind, channel=2).queue == queue
    assert c.expect(commands.Queue.Declare, channel=2).queue == f"{queue}.due"
    assert c.expect(commands.Queue.Declare, channel=2).queue == f"{queue}.dead"


def _sibling_cancelled(c: Peer, ctags: dict[str, str], queue: str) -> None:
    """After the broker cancelled `queue`'s consumer, magne cancels the queue's other one (its due queue's) on
    channel 1 before consuming both again; answered here."""
    ch, f = next_method(c)
    assert (ch, type(f)) == (1, commands.Basic.Cancel) and f.consumer_tag == ctags[f"{queue}.due"], (ch, f)
    c.send(commands.Basic.CancelOk(f.consumer_tag), channel=1)


def _consumed_again(c: Peer, queue: str) -> commands.Basic.Consume:
    """The two basic.consume of a queue consumed again on channel 1 (the queue's, then its due queue's); the
    queue's is returned."""
    ch, consume = next_method(c)
    assert (ch, type(consume)) == (1, commands.Basic.Consume), f"expected basic.consume on 1, got {consume!r} on {ch}"
    ch, due = next_method(c)
    assert (ch, type(due), due.queue) == (1, commands.Basic.Consume, f"{queue}.due"), (ch, due)
    return consume


def test_broker_cancel_reconsumes_that_queue_on_the_same_connection(rig):
    """basic.cancel for one of two queues: after a backoff, the queue is re-declared on channel 2, channel 2 is
    closed, and the queue is consumed again on channel 1 with a new consumer tag; same socket, no reconnect, and
    the other queue's running task still acks on channel 1.

    Catches: a cancel treated as a lost connection (reconnect: every running task's ack lost), re-consuming at
    once without a backoff or without checking the queue first, reusing the cancelled consumer tag (RabbitMQ
    answers 530 NOT_ALLOWED for a tag in use on the channel), deliveries of the new consumer not mapped to it.
    """
    io = rig.start(("A", "B"))
    c, ctags = open_consuming(rig, ("A", "B"))
    assert io.ready.wait(2)
    deliver(c, ctags["A"], 1)
    (running,) = rig.take(1)
    c.send(commands.Basic.Cancel(ctags["B"], nowait=True), channel=1)
    t0 = time.monotonic()
    _sibling_cancelled(c, ctags, "B")
    _probe_frames(c, "B")
    assert time.monotonic() - t0 > 0.4, "re-declared at once: no backoff"
    c.send(*probe_replies("B"), channel=2)
    consume = _consumed_again(c, "B")
    ch, close = next_method(c)
    assert (ch, type(close)) == (2, commands.Channel.Close), f"expected channel.close on 2, got {close!r} on {ch}"
    assert consume.queue == "B" and not consume.no_ack
    assert consume.consumer_tag not in ctags.values(), "the cancelled consumer tag was reused"
    c.send(commands.Channel.CloseOk(), channel=2)
    c.send(commands.Basic.ConsumeOk(consume.consumer_tag), channel=1)

    deliver(c, consume.consumer_tag, 2, queue="B")
    (d,) = rig.take(1)
    assert (d.queue, d.tag) == ("B", 2)
    report_batch(io, [running, d])
    assert ack_of(next_method(c)[1]) == (2, True)
    assert not c.eof and not rig.peer.pending(), "the connection was replaced"
    assert (io.stats.cancels, io.stats.reconnects) == (1, 0)


def test_cancelled_queue_whose_check_fails_is_retried_without_touching_channel_1(rig):
    """basic.cancel, then the re-declaration on channel 2 fails (channel.close 404, "home node down"): magne
    answers close-ok on channel 2, leaves channel 1 alone (its running task still acks) and tries again after a
    backoff, and consumes the queue once the check passes.

    Catches: a 404 on the probe channel taken for the consuming channel's close (reconnect), a retry without a
    backoff (a busy loop against a down node), or no retry at all.
    """
    io = rig.start(("A", "B"))
    c, ctags = open_consuming(rig, ("A", "B"))
    assert io.ready.wait(2)
    deliver(c, ctags["A"], 1)
    (running,) = rig.take(1)
    c.send(commands.Basic.Cancel(ctags["B"], nowait=True), channel=1)
    _sibling_cancelled(c, ctags, "B")
    _probe_frames(c, "B")
    c.send(commands.Channel.OpenOk(), commands.Exchange.DeclareOk(),
           commands.Channel.Close(404, "NOT_FOUND - home node of queue 'B' is down", 50, 10), channel=2)
    ch, close_ok = next_method(c)
    assert (ch, type(close_ok)) == (2, commands.Channel.CloseOk), f"got {close_ok!r} on channel {ch}"
    t_closed = time.monotonic()

    io.report(running)  # channel 1 still works: its tags are still valid
    ch, f = next_method(c)
    assert ch == 1 and ack_of(f) == (1, True)
    assert quiet(c, 0.3) == [], "something was written right after the failed check"
    _probe_frames(c, "B")
    assert time.monotonic() - t_closed > 0.45, "checked again without a backoff"
    c.send(*probe_replies("B"), channel=2)
    consume = _consumed_again(c, "B")
    assert consume.queue == "B"
    ch, close = next_method(c)
    assert (ch, type(close)) == (2, commands.Channel.Close), f"got {close!r} on channel {ch}"
    assert consume.consumer_tag not in ctags.values()
    assert not c.eof and not rig.peer.pending() and io.stats.reconnects == 0


# -- 8. the broker closing the channel or the connection ----------------------------------------------------------
def test_channel_close_from_broker_is_answered_then_reconnects(rig):
    """channel.close (406, e.g. the delivery-ack timeout) on the consuming channel: channel.close-ok goes out
    before the socket is dropped, then magne reconnects and consumes again; the running task's late outcome
    is stale.

    Catches: the close-ok lost (abort without writing what is queued: the broker logs an unanswered close and
    holds the channel), no reconnect after a channel-level error, or the old tag acked on the new channel.
    """
    io = rig.start(("A",))
    c1, ctags = open_consuming(rig)
    assert io.ready.wait(2)
    deliver(c1, ctags["A"], 1)
    (running,) = rig.take(1)
    c1.send(commands.Channel.Close(406, "PRECONDITION_FAILED - delivery acknowledgement on channel 1 timed out",
                                   0, 0), channel=1)
    ch, f = next_method(c1)
    assert (ch, type(f)) == (1, commands.Channel.CloseOk), f"got {f!r} on channel {ch}"
    assert c1.wait_eof(1.0), "the connection was kept after its only channel closed"
    c2, _ = open_consuming(rig)
    wait_for(lambda: io.stats.reconnects == 1, what="consuming again")
    io.report(running)
    wait_for(lambda: io.stats.stale == 1, what="the old outcome counted as stale")
    assert quiet(c2, 0.2) == []


def test_connection_close_from_broker_is_answered_then_reconnects(rig):
    """connection.close (320 CONNECTION_FORCED, e.g. a node shutting down): connection.close-ok is written before
    the socket goes, then magne reconnects (320 is not a permanent failure).

    Catches: the close-ok not written, or the thread ending (or failing) instead of reconnecting.
    """
    io = rig.start(("A",))
    c1, _ = open_consuming(rig)
    assert io.ready.wait(2)
    c1.send(commands.Connection.Close(320, "CONNECTION_FORCED - broker forced connection closure", 0, 0))
    ch, f = next_method(c1)
    assert (ch, type(f)) == (0, commands.Connection.CloseOk), f"got {f!r} on channel {ch}"
    assert c1.wait_eof(1.0)
    open_consuming(rig)
    wait_for(lambda: io.stats.reconnects == 1, what="consuming again")
    assert io.failed is None and not io.finished.is_set()


# -- 9. stopping ------------------------------------------------------------------------------------------------
def test_warm_stop(rig):
    """request_stop(): basic.cancel for every consumer, basic.nack(requeue, single) for every delivery still in
    the work queue, then nothing but heartbeats while a task runs; its ACK is written, then channel.close, then
    (after close-ok) connection.close; after connection.close-ok the thread ends. A delivery arriving after the
    cancel goes straight back.

    Catches: unstarted deliveries left unsettled or rejected (reject counts towards a quorum queue's delivery
    limit), closing before the running task's ack (the broker redelivers finished work), heartbeats stopping
    during the wait, connection.close before channel.close-ok, or a thread that never ends.
    """
    io = rig.start(("A", "B"), heartbeat=1)
    c, ctags = open_consuming(rig, ("A", "B"), heartbeat=1)
    assert io.ready.wait(2)
    for tag, q in [(1, "A"), (2, "B"), (3, "A")]:
        deliver(c, ctags[q], tag, queue=q)
    wait_for(lambda: io.stats.delivered == 3, what="three deliveries")
    running = rig.work.get(timeout=1)  # tag 1 starts; 2 and 3 stay in the work queue
    assert running is not None and running.tag == 1
    io.request_stop()

    got = [next_method(c) for _ in range(6)]  # four consumers (two queues and their due queues), two nacks
    cancels = {f.consumer_tag for ch, f in got if ch == 1 and isinstance(f, commands.Basic.Cancel)}
    nacks = [(f.delivery_tag, f.multiple, f.requeue) for ch, f in got if ch == 1 and isinstance(f, commands.Basic.Nack)]
    assert cancels == set(ctags.values()), got
    assert sorted(nacks) == [(2, False, True), (3, False, True)], got
    c.send(*[commands.Basic.CancelOk(t) for t in ctags.values()], channel=1)
    deliver(c, ctags["B"], 4, queue="B")  # was on the wire before the broker saw the cancel
    f = next_method(c)[1]
    assert isinstance(f, commands.Basic.Nack) and (f.delivery_tag, f.multiple, f.requeue) == (4, False, True), f
    with pytest.raises(Empty):
        rig.work.get_nowait()

    beats = 0
    t0 = time.monotonic()
    while time.monotonic() - t0 < 0.65:  # the task runs: nothing but heartbeats
        c.heartbeat()
        try:
            _ch, f = c.read_frame(0.3)
        except PeerTimeout:
            continue
        assert isinstance(f, Heartbeat), f"{f!r} written while a task was still running"
        beats += 1
    assert beats >= 1, "no heartbeat during the warm stop"
    assert not io.finished.is_set()

    io.report(running)
    assert ack_of(next_method(c)[1]) == (1, True)
    ch, f = next_method(c)
    assert ch == 1 and isinstance(f, commands.Channel.Close), f
    assert quiet(c, 0.1) == [], "connection.close before channel.close-ok"
    c.send(commands.Channel.CloseOk(), channel=1)
    ch, f = next_method(c)
    assert ch == 0 and isinstance(f, commands.Connection.Close), f
    assert not io.finished.wait(0.1), "ended before connection.close-ok"
    c.send(commands.Connection.CloseOk())
    assert io.finished.wait(2), "the thread did not end after connection.close-ok"
    assert io.failed is None
    assert c.wait_eof(1.0)


def test_cold_stop_closes_at_once_with_work_in_flight(rig):
    """request_stop(force=True) with a task running: channel.close is written without waiting for it, then
    connection.close, and the thread ends; the task's late outcome writes nothing.

    Catches: a cold stop that waits for running tasks like a warm one (the worker would hang past its
    shutdown timeout), or writes an ack on a closing channel.
    """
    io = rig.start(("A",))
    c, ctags = open_consuming(rig)
    assert io.ready.wait(2)
    deliver(c, ctags["A"], 1)
    (running,) = rig.take(1)
    io.request_stop(force=True)
    while True:
        ch, f = next_method(c, 1.0)
        assert not isinstance(f, commands.Basic.Ack), f
        if isinstance(f, commands.Channel.Close):
            break
    assert ch == 1
    io.report(running)
    c.send(commands.Channel.CloseOk(), channel=1)
    ch, f = next_method(c)
    assert ch == 0 and isinstance(f, commands.Connection.Close), f
    c.send(commands.Connection.CloseOk())
    assert io.finished.wait(2)
    assert io.failed is None


# -- 10, 11. the handshake -------------------------------------------------------------------------------------
def test_frame_max_zero_on_both_sides(rig):
    """frame_max=0 ("no limit") in the URL and in the broker's tune: the connection opens with a usable frame
    size, setup completes, and a delivery is received and acked.

    Catches: a ValueError (or a frame_max of 0 used as a limit: every frame refused) when both sides say 0.
    """
    io = rig.start(("A",), frame_max=0)
    c = rig.accept()
    c.start()
    c.send(commands.Connection.Tune(channel_max=0, frame_max=0, heartbeat=0))
    tune_ok = c.expect(commands.Connection.TuneOk)
    c.expect(commands.Connection.Open)
    assert tune_ok.frame_max >= 8192
    c.send(commands.Connection.OpenOk())
    ctags = read_setup(c, ("A",))
    answer_setup(c, ("A",), ctags)
    assert io.ready.wait(2), f"setup did not complete: {io.failed}"
    deliver(c, ctags["A"], 1, body=b"x" * 20000)
    (d,) = rig.take(1)
    assert len(d.body) == 20000
    io.report(d)
    assert ack_of(next_method(c)[1]) == (1, True)


def test_first_connection_refused_permanently_ends_the_thread(rig):
    """connection.close 403 during the handshake of the first connection: close-ok is written, and the thread
    ends with `failed` set and `permanent` True, without retrying.

    Catches: retrying a login the broker refused (a supervisor would restart forever), `permanent` not set, or
    `ready` set.
    """
    io = rig.start(("A",))
    c = rig.accept()
    c.start()
    c.send(commands.Connection.Close(403, "ACCESS_REFUSED - Login was refused using authentication mechanism PLAIN",
                                     0, 0))
    ch, f = next_method(c)
    assert ch == 0 and isinstance(f, commands.Connection.CloseOk), f
    assert io.finished.wait(2), "the thread did not end"
    assert io.failed is not None and "403" in io.failed
    assert io.permanent is True and not io.ready.is_set()
    assert not rig.peer.pending(0.3), "connected again after a permanent refusal"


def test_join_after_the_thread_ended(rig):
    """The I/O thread is a threading.Thread: joining it after it ended returns, is_alive() is False.

    Catches: attributes of IOThread clobbering threading.Thread internals (`_stop`, `_started`, ...).
    """
    io = rig.start(("A",))
    c = rig.accept()
    c.close()  # the first connection fails: the thread ends at once
    assert io.finished.wait(2)
    io.join(1)
    assert not io.is_alive()


def test_reconnect_failing_synchronously_is_retried(rig, monkeypatch):
    """While the network is down (no route: connect() fails at once rather than in progress), reconnect attempts
    fail and are retried with backoff; once it is back, magne reconnects.

    Catches: a synchronous connect error (Connection.start raising ConnectionLost at once, as it does for an
    IP-literal host with no route) escaping the I/O thread's loop: the thread crashed and the worker exited on a
    network blip (fixed in 656785e; this is its regression test).
    """
    unreachable = []

    class Unroutable(socket.socket):
        def connect_ex(self, address: Any) -> int:
            return errno.ENETUNREACH if unreachable else super().connect_ex(address)

    fake_socket = types.SimpleNamespace(**{k: getattr(socket, k) for k in dir(socket) if not k.startswith("__")})
    fake_socket.socket = Unroutable
    monkeypatch.setattr(magne.engine.transport, "socket", fake_socket)

    io = rig.start(("A",))
    c1, _ = open_consuming(rig)
    assert io.ready.wait(2)
    unreachable.append(True)
    c1.close()
    time.sleep(0.5)  # the first attempt (0.2 s after the loss) fails
    assert not io.finished.is_set(), f"the I/O thread ended: {io.failed}"
    unreachable.clear()
    open_consuming(rig)
    wait_for(lambda: io.stats.reconnects == 1, 3.0, "consuming again")


def test_reconnect_reusing_the_fd_of_a_link_that_just_closed(rig):
    """The publishing link is closed by the broker in the same loop turn in which the consuming connection's
    reconnect comes due, and the new consuming socket gets the link's old fd number (the lowest free one): the
    I/O thread goes on and reconnects.

    The turn is widened with an outcome whose generation check takes 0.25 s (a long drain, as a large batch
    of outcomes makes one), and the process's lower free fds are filled so that the link's fd is the lowest.

    Catches: a stale selector registration of one connection colliding with the other's new socket on the same
    fd: sel.register raised KeyError "(FD n) is already registered" and the I/O thread crashed (the link's
    registration was dropped only after the consumer's new one was made; fixed in 656785e, this is its
    regression test).
    """
    io = rig.start(("A",))
    c1, ctags = open_consuming(rig)
    assert io.ready.wait(2)
    deliver(c1, ctags["A"], 1)
    (d,) = rig.take(1)
    io.report(make_dead(d))
    link = rig.accept()
    handshake(link)
    link.expect(commands.Channel.Open, channel=1)
    link.send(commands.Channel.OpenOk(), channel=1)
    link.expect(commands.Confirm.Select, channel=1)
    link.send(commands.Confirm.SelectOk(), channel=1)
    link.expect(commands.Channel.Open, channel=2)
    link.send(commands.Channel.OpenOk(), channel=2)
    declare = link.expect(commands.Queue.Declare, channel=2)  # the dead-letter queue, on the declarations' channel
    link.send(commands.Queue.DeclareOk(declare.queue, 0, 0), channel=2)
    link.expect(commands.Basic.Publish, channel=1)
    wait_for(lambda: io.link.conn is not None and io.link.conn.sock is not None and bool(io.link.tracker), what="link")
    link_fd = io.link.conn.sock.fileno()

    c1.close()
    wait_for(lambda: io.consumer.conn is None, what="the consuming connection lost")
    lost_at = time.monotonic()  # its reconnect is due 0.2 s after the loss
    gc.collect()
    fillers = []
    while (s := socket.socket()).fileno() < link_fd:
        fillers.append(s)
    s.close()

    class SlowGen:
        def __ne__(self, _other: object) -> bool:
            time.sleep(0.25)
            return True

    try:
        time.sleep(max(0.0, lost_at + 0.1 - time.monotonic()))
        io.outcomes.append(Delivery(9, SlowGen(), "A", b"", b"", False))  # drained in the turn that reads the close
        link.send(commands.Connection.Close(320, "CONNECTION_FORCED - broker forced connection closure", 0, 0))
        c2 = rig.accept()
        assert not io.finished.wait(0.3), f"the I/O thread ended: {io.failed}"
    finally:
        for f in fillers:
            f.close()
    handshake(c2)
    answer_setup(c2, ("A",), read_setup(c2, ("A",)))
    wait_for(lambda: io.stats.reconnects == 1, what="consuming again")
