"""Regression tests from the review of issue 22 (schedules, fleet-wide caps and rates)."""

from __future__ import annotations

import datetime as dt
import threading
import time
from types import SimpleNamespace

import pytest
from pamqp import commands

from magne import task
from magne.amqp import codec, names
from magne.amqp.confirms import Returned
from magne.amqp.errors import BrokerTimeout, ChannelClosed
from magne.amqp.url import Nodes, parse_url
from magne.cli import build_parser
from magne.delivery import Delivery
from magne.engine.client import Client
from magne.engine.session import Call, Delivered, Session, Subscription
from magne.errors import RegistryError
from magne.gate import Gate, Limit, _exists
from magne.leader import CHECKPOINT, Scheduler, last_ticks
from magne.schedule import UTC, parse_tick_id, tick_id
from magne.schedule_status import render
from magne.testing import worker


@task(name="r22_every", every=10)
def r22_every():
    pass


class _Locks:
    """A Client as the scheduler sees it: its `locks` session, calls (declares) and confirmed publishes."""

    def __init__(self):
        self.locks = SimpleNamespace(conn=object())
        self.taken: set[str] = set()  # lock queues another connection holds
        self.declared: list[str] = []
        self.published: list[tuple[str, str]] = []

    def call(self, method, *replies, timeout=None, session=None):
        if isinstance(method, names.QueueDeclare):
            self.declared.append(method.queue)
            if method.exclusive and method.queue in self.taken:
                raise ChannelClosed(1, 405, "RESOURCE_LOCKED")

    def publish_confirmed(self, exchange, rk, body, header):
        self.published.append((exchange, rk))


def test_a_leader_whose_lock_queue_was_deleted_and_taken_by_another_stops_leading():
    now = dt.datetime(2026, 1, 1, 12, 0, 1, tzinfo=UTC)
    client = _Locks()
    s = Scheduler(lambda: client, [r22_every], stream="st", clock=now.timestamp)
    s.conn = client.locks.conn
    s.led["r22_every"] = now + dt.timedelta(seconds=9)  # leading, next tick in 9 s
    s.redeclare_at = float("inf")
    s._turn()
    assert s.leading() == ["r22_every"]
    client.taken.add("st.leader.r22_every")  # deleted under us, then declared by another worker
    s.next_try = 0.0
    s._turn()
    assert s.leading() == []  # before the fix it kept leading: two leaders, every tick sent twice


class _Outbox:
    def __init__(self):
        self.data = b""

    def write(self, data):
        self.data += data


def test_a_token_got_after_its_lease_call_timed_out_is_given_back_not_held_forever():
    """basic.get-ok arriving after the gate's `lease` gave up (BrokerTimeout): nobody would ever release or ack that
    token, so the cap would shrink by one for as long as the process lives. The session gives it back at once."""
    client = Client(parse_url("amqp://guest:guest@127.0.0.1:1/"), "unit client", timeout=30.0)
    try:
        call = Call(names.BasicGet(queue="Q.cap.3", no_ack=False), (commands.Basic.GetOk, commands.Basic.GetEmpty))
        with pytest.raises(BrokerTimeout):
            client._wait(call, 0.05, "get-ok")
    finally:
        client.close(1.0)
    session = Session(Nodes([parse_url("amqp://guest:guest@127.0.0.1:1/")]), "unit leases", None)
    outbox = _Outbox()
    session.conn = SimpleNamespace(outbox=outbox, answered=lambda ch: None)
    session.inflight.append(call)
    session._content(1, commands.Basic.GetOk(delivery_tag=7, exchange="", routing_key="Q.cap.3"), b"h", b"")
    assert outbox.data == codec.encode_nack(1, 7, False, True)
    assert not session.inflight


@pytest.mark.parametrize("every", [1e12, 1e300, 366 * 86400 + 1])
def test_an_every_too_large_for_a_due_time_fails_at_import_not_in_every_leaders_turn(every):
    with pytest.raises(RegistryError, match="every= must be a number of seconds from 0.1 to 31622400"):
        task(name="r22_huge", every=every)(lambda: None)


@task(name="r22_weekly", cron="0 6 * * 1")
def r22_weekly():
    pass


class _Stream(_Locks):
    """What a leader publishes, read back as a new leader reads the stream's tail."""

    def publish_confirmed(self, exchange, rk, body, header):
        props = codec.decode_properties(header) if isinstance(header, bytes) else header
        self.published.append((props.message_id, dict(props.headers or {})))


def test_a_failover_just_after_a_weekly_due_time_sends_that_tick(monkeypatch):
    """A new leader reads the stream back 6 days at most: a weekly schedule's last tick is out of its sight, so a
    leader elected just after a due time took the schedule for a new one and skipped that week's run."""
    stream = _Stream()

    def tail(client, name, since, checkpoints=True):
        found = {}
        for mid, headers in stream.published:
            tick = parse_tick_id(mid)
            if tick and (checkpoints or CHECKPOINT not in headers) and (tick[0] not in found or tick[1] > found[tick[0]][0]):
                found[tick[0]] = (tick[1], "?")
        return found

    monkeypatch.setattr("magne.leader.last_ticks", tail)
    saturday = dt.datetime(2026, 3, 28, 6, 0, tzinfo=UTC)
    monday = dt.datetime(2026, 3, 30, 6, 0, tzinfo=UTC)
    a = Scheduler(lambda: stream, [r22_weekly], stream="st", clock=saturday.timestamp)
    a._turn()  # leads from Saturday; nothing recorded yet: its first tick is Monday 06:00; then it dies at 05:59
    assert a.led == {"r22_weekly": monday}
    b = Scheduler(lambda: stream, [r22_weekly], stream="st", clock=(monday + dt.timedelta(seconds=2)).timestamp)
    b._turn()  # elected 2 s after the due time
    ticks = [mid for mid, headers in stream.published if CHECKPOINT not in headers]
    assert ticks == ["r22_weekly@2026-03-30T06:00:00.000000+00:00"]
    assert b.led == {"r22_weekly": monday + dt.timedelta(days=7)}
    assert tail(None, "st", None, checkpoints=False) == {"r22_weekly": (monday, "?")}  # magne status: ticks only


class _Pools:
    """A Client as the gate sees it: a rate pool whose `.wait` queue was deleted under a running worker."""

    leases = locks = "session"

    def __init__(self):
        self.wait_exists = False
        self.tags = iter(range(1, 1000))
        self.declared: list[str] = []

    def lease(self, queue, timeout=None):
        return (next(self.tags), 1)

    def release(self, tag, gen, requeue=True):
        pass

    def ack(self, tag, gen=None, multiple=False, session=None):
        pass

    def publish_confirmed(self, exchange, rk, body, props, timeout=None):
        if rk.endswith(".wait") and not self.wait_exists:
            raise Returned("unroutable")

    def call(self, method, *replies, timeout=None, session=None):
        if isinstance(method, names.QueueDeclare) and not method.passive:
            self.declared.append(method.queue)
            self.wait_exists = self.wait_exists or method.queue.endswith(".wait")


def test_a_rate_pools_wait_queue_deleted_under_the_gate_is_declared_again_not_retried_forever():
    """Every start publishes the token's replacement into `<pool>.wait`; with that queue gone the publish is returned
    (mandatory), and the gate retried it every 50 ms forever, a warning each time, the task never starting again."""
    client, got = _Pools(), []
    gate = Gate(lambda: client, {"R": Limit(None, (2, 1.0))}, {"R": got.append}, lambda d: None)
    gate.queues["R"].ready = True  # the pool was made and marked long ago
    gate.start()
    try:
        gate.put(Delivery(1, 0, "R", b"", b"", False))
        deadline = time.monotonic() + 3.0
        while not got and time.monotonic() < deadline:
            time.sleep(0.01)
    finally:
        gate.stop()
    assert len(got) == 1 and "R.rate.2.1000.wait" in client.declared


class _Leases:
    def __init__(self):
        self.released: list[tuple[int, int]] = []

    def lease(self, queue, timeout=None):
        return (5, 1)

    def release(self, tag, gen, requeue=True):
        self.released.append((tag, gen))


def test_a_cap_token_goes_back_on_the_client_it_was_leased_from_not_on_a_replacement():
    """The publisher's Client can be replaced (closed by a task, its loop thread ended): its leases went back with
    its connection. Releasing (tag 5, gen 1) on the new Client's leases channel nacked another run's token there
    (the cap exceeded), or an unknown tag, a 406 that closes that channel and returns every token it holds."""
    old, new = _Leases(), _Leases()
    current = [old]
    gate = Gate(lambda: current[0], {"C": Limit(2)}, {"C": lambda d: None}, lambda d: None)
    gate.queues["C"].ready = True
    d = Delivery(9, 0, "C", b"", b"", False)
    gate.put(d)
    assert gate._admit(gate.queues["C"]) is True
    current[0] = new
    gate.report(d)
    assert old.released == [(5, 1)] and new.released == []


class _SlowStream:
    """A stream whose tail takes longer than TAIL_TIMEOUT to read, a record arriving every 50 ms."""

    def __init__(self):
        self.marker = None
        self.thread = None

    def publish_confirmed(self, exchange, rk, body, props):
        self.marker = props.message_id

    def consume(self, queue, on_message, prefetch=100, arguments=None):
        def feed():
            due = dt.datetime(2026, 1, 1, tzinfo=UTC)
            for i in range(20):
                p = commands.Basic.Properties(message_id=tick_id("t", due + dt.timedelta(seconds=i)))
                on_message(Delivered(i + 1, 1, codec.header_payload(p, 0), b"", False))
                time.sleep(0.05)
            on_message(Delivered(99, 1, codec.header_payload(commands.Basic.Properties(message_id=self.marker), 0),
                                 b"", False))

        self.thread = threading.Thread(target=feed, daemon=True)
        self.thread.start()
        return "ctag"

    def ack(self, tag, gen=None, multiple=False, session=None):
        pass

    def cancel(self, tag):
        pass


def test_reading_a_long_tail_that_keeps_coming_is_not_a_time_out(monkeypatch):
    """A weekly schedule makes a new leader read 6 days back: with a 1 s schedule in the same stream that is 500k
    records, about 15 s at the measured 35k/s. A fixed 15 s limit failed every take-over (no leader, ever)."""
    monkeypatch.setattr("magne.leader.TAIL_TIMEOUT", 0.4)
    found = last_ticks(_SlowStream(), "st", dt.datetime(2026, 1, 1, tzinfo=UTC))  # 1 s of records, never idle 0.4 s
    assert found["t"][0] == dt.datetime(2026, 1, 1, 0, 0, 19, tzinfo=UTC)


def test_a_schedule_grace_shorter_than_a_leaders_lateness_is_refused(capsys):
    """Every tick later than the grace is skipped, in every turn, not only at a take-over: with a grace of 10 ms a
    leader that woke 20 ms late skipped nearly every tick of an every=0.1 schedule, a warning each time."""
    with pytest.raises(SystemExit):
        build_parser().parse_args(["worker", "m", "--schedule-grace", "0.01"])
    assert "--schedule-grace: must be at least 5" in capsys.readouterr().err
    assert build_parser().parse_args(["worker", "m", "--schedule-grace", "5"]).schedule_grace == 5.0


class _SharedLocks(_Locks):
    """The `locks` channel shared with the gate: the gate's refused fill lock fails our declare pipelined with it."""

    def __init__(self):
        super().__init__()
        self.crossed = 1

    def call(self, method, *replies, timeout=None, session=None):
        if isinstance(method, names.QueueDeclare) and self.crossed:
            self.crossed -= 1
            raise ChannelClosed(1, 405, "RESOURCE_LOCKED - cannot obtain exclusive access to locked queue "
                                        "'Q.cap.2.init' in vhost '/'")
        return super().call(method, *replies, timeout=timeout, session=session)

    def consume(self, *args, **kwargs):
        raise AssertionError("the leader dropped its lead and took over again (read the stream's tail)")


def test_another_callers_refusal_on_the_shared_locks_channel_is_not_a_lost_lock():
    """Seen on the broker: a worker's gate logged the scheduler's 405 as its own. The other way round, a leader
    confirming its lock took the gate's 405 as 'another worker leads now' and stopped sending ticks."""
    now = dt.datetime(2026, 1, 1, 12, 0, 1, tzinfo=UTC)
    client = _SharedLocks()
    s = Scheduler(lambda: client, [r22_every], stream="st", clock=now.timestamp)
    s.conn = client.locks.conn
    s.led["r22_every"] = now + dt.timedelta(seconds=9)
    s.redeclare_at = float("inf")
    s._turn()
    assert s.leading() == ["r22_every"] and client.declared == ["st.leader.r22_every"]


def test_the_gate_does_not_take_a_schedulers_refusal_on_the_shared_locks_channel_for_its_own():
    client = _SharedLocks()
    client.crossed, client.taken = 1, set()
    assert _exists(client, "Q.cap.2.filled") is True  # the 405 named another queue: asked again


often: list[int] = []


@task(name="r22_often", every=5)
def r22_often():
    often.append(1)


def test_advancing_a_day_of_a_frequent_schedule_is_not_too_many_messages():
    """advance(86400) with every=5 sends 17280 ticks: join() raised TooManyMessages ('a task that keeps sending
    itself?') past the default max_messages of 10000. The ticks advance() sends do not count toward it."""
    often.clear()
    with worker(sync=True, max_messages=1000, start=dt.datetime(2026, 1, 1, tzinfo=UTC)) as w:
        w.advance(8640)  # 1728 ticks of every=5 (and a few of this file's others), past max_messages
    assert len(often) == 1728


class _Recorded(_SlowStream):
    """A stream holding a tick sent by one worker and the checkpoint of the worker that leads now."""

    def consume(self, queue, on_message, prefetch=100, arguments=None):
        due = dt.datetime(2026, 1, 1, tzinfo=UTC)
        for i, (mid, headers) in enumerate([
                (tick_id("t", due), {"x-magne-scheduler": "web-1/7"}),
                (tick_id("t", due + dt.timedelta(seconds=29)), {CHECKPOINT: "web-2/9"}),
                (self.marker, {})]):
            p = commands.Basic.Properties(message_id=mid, headers=headers)
            on_message(Delivered(i + 1, 1, codec.header_payload(p, 0), b"", False))
        return "ctag"


def test_status_names_the_current_leader_by_its_latest_checkpoint():
    """The issue asks `magne status` for the current leader (host, pid); it showed only 'led' and who sent the last
    tick (a worker that may be gone). A leader's checkpoint, written every minute, names it."""
    leaders: dict[str, str] = {}
    found = last_ticks(_Recorded(), "st", dt.datetime(2026, 1, 1, tzinfo=UTC), checkpoints=False, leaders=leaders)
    assert found == {"t": (dt.datetime(2026, 1, 1, tzinfo=UTC), "web-1/7")} and leaders == {"t": "web-2/9"}
    line = render([{"task": "t", "queue": "T", "schedule": "every 30s", "led": True, "leader": "web-2/9",
                    "last_tick": "T1", "last_sent_by": "web-1/7", "next": ["N1"], "note": ""}])[2]
    assert line == "  t (every 30s, queue T): led by web-2/9; last tick T1 sent by web-1/7; next N1"


def test_late_messages_of_a_cancelled_stream_consumer_are_not_nacked():
    """After last_ticks cancels its stream consumer, records appended meanwhile (other leaders' ticks) still arrive.
    They were nacked, as a cancelled classic consumer's are; RabbitMQ answers a nack on a stream with 540
    NOT_IMPLEMENTED, a connection error (checked on the broker): the calls connection was dropped."""
    session = Session(Nodes([parse_url("amqp://guest:guest@127.0.0.1:1/")]), "unit calls", None)
    outbox, sent = _Outbox(), []
    session.conn = SimpleNamespace(outbox=outbox, send=lambda ch, *m: sent.extend(m))
    session.open_ch = True
    session.subs["s1"] = Subscription("s1", "st", lambda m: None, arguments={"x-stream-offset": "first"})
    session.subs["q1"] = Subscription("q1", "q", lambda m: None)
    session.unsubscribe("s1")
    session.unsubscribe("q1")
    session._content(1, (b"s1", 7, False, b"", b"st"), b"", b"")
    session._content(1, (b"q1", 8, False, b"", b"q"), b"", b"")
    assert outbox.data == codec.encode_nack(1, 8, False, True)  # the classic queue's goes back, the stream's not
    assert [type(m).__name__ for m in sent] == ["Cancel", "Cancel"]
    session._frame(1, commands.Basic.CancelOk(consumer_tag="s1"))
    assert session.streams_gone == set()
