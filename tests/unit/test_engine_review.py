"""Review of the engine (issue 19), without a socket: the Sender's suspects, the Tracker's return matching, the
protocol's channel-close table, and what the worker's copies keep after a permanent error of the link.

Driven as tests/unit/test_settle.py drives them: a real Sender on an unstarted Connection whose channels are
marked open, frames dispatched as the connection would.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque

import pytest
from pamqp import commands
from pamqp import frame as pframe
from pamqp import header as pheader
from test_protocol import frames, opened, sent
from test_settle import answer, decided, dl, make, published

from magne import limits, topology
from magne.amqp import codec
from magne.amqp.confirms import Returned, Tracker
from magne.amqp.errors import ConnectionClosed, ConnectionLost, FrameError
from magne.amqp.outbox import Outbox
from magne.amqp.protocol import ChannelPhase, Phase
from magne.amqp.url import Nodes, parse_url
from magne.delivery import Outcome
from magne.engine.client import Client
from magne.engine.connection import Connection
from magne.engine.reconnect import Reconnector
from magne.engine.sender import PUB, Outgoing, Sender
from magne.policy import RetryPolicy
from magne.publisher import Publisher

Ack = commands.Basic.Ack


def publishes(conn) -> list[str]:
    return [q for _c, k, q in published(conn) if k == "publish"]


def test_copies_dropped_by_a_new_generation_do_not_keep_the_link_one_at_a_time():
    s, sender, _out, _stats, conn = make(gen=1)
    s.drain(deque([dl(1, Outcome.DEAD), dl(2, Outcome.DEAD)]), 0.0)
    sender.pump(0.0)
    assert publishes(conn) == ["q.dead", "q.dead"]
    # The broker refuses one of them by closing the publish channel: both are suspects now, back in line...
    answer(conn, PUB, commands.Channel.Close(406, "PRECONDITION_FAILED", 60, 40))
    assert len(sender.suspects) == 2 and len(sender.queue) == 2
    # ...and the consuming connection is lost meanwhile: their originals come back, the copies are dropped.
    s.reset(2, Outbox())
    assert not sender.queue
    answer(conn, PUB, commands.Channel.OpenOk())
    answer(conn, PUB, commands.Confirm.SelectOk())
    published(conn)
    s.drain(deque([dl(t, Outcome.DEAD, gen=2) for t in (1, 2, 3)]), 0.0)
    sender.pump(0.0)
    assert publishes(conn) == ["q.dead"] * 3  # nothing of theirs is on the wire: no reason to go one at a time


def test_a_permanent_connection_error_of_the_link_keeps_the_copies_declarations():
    s, sender, _out, _stats, _conn = make()
    d = decided(1, RetryPolicy(max_retries=3))  # a retry: its delay queue is declared before the copy goes
    assert d.copy_declare is not None
    s.drain(deque([d]), 0.0)
    sender.failed(ConnectionClosed(530, "NOT_ALLOWED - access to vhost '/' refused for user 'guest': connection "
                                        "limit (2) is reached"), 0.0)
    assert d.blame == 1 and s.waiting  # failed by the link, waiting for its backoff
    s.service(s.waiting[0][0])
    [copy] = sender.queue
    assert copy.preps, "the copy goes to a delay queue that may have expired, without declaring it"


def test_a_return_waits_for_the_ack_that_covers_its_publish():
    t = Tracker()
    t.add("routed", ("", "q", "m1", hash(b"a")))
    t.add("unroutable", ("amq.direct", "nowhere", "m2", hash(b"b")))
    # AMQP only says the return comes before the ack of its publish; another ack may come in between.
    t.returned(commands.Basic.Return(312, "NO_ROUTE", "amq.direct", "nowhere"), "m2", b"b")
    assert t.confirm(Ack(delivery_tag=1)) == [("routed", None)]
    [(token, error)] = t.confirm(Ack(delivery_tag=2))
    assert token == "unroutable" and isinstance(error, Returned)


def test_crossing_channel_closes_end_with_the_close_ok():
    p = opened()
    closed: list = []
    p.on_channel_close = lambda ch, exc: closed.append((ch, exc.code))
    p.call(1, commands.Channel.Open(), (commands.Channel.OpenOk,))
    p.receive(frames(1, commands.Channel.OpenOk()), 1.0)
    done: list = []
    p.call(1, commands.Channel.Close(200, "stopping", 0, 0), (commands.Channel.CloseOk,), done.append)
    sent(p)
    assert p.channels[1] is ChannelPhase.CLOSING
    # The broker closed the channel before it saw our close (a consumer_timeout, say): it answers ours after it.
    p.receive(frames(1, commands.Channel.Close(406, "PRECONDITION_FAILED - delivery acknowledgement timed out",
                                               60, 80)), 1.1)
    assert [type(f).__name__ for _c, f in sent(p)] == ["CloseOk"]
    p.receive(frames(1, commands.Channel.CloseOk()), 1.2)
    assert done and 1 not in p.channels


def test_a_closed_event_loop_waiting_for_room_does_not_end_the_shared_client():
    client = Client(parse_url("amqp://guest:guest@127.0.0.1:1/"), "unit client", timeout=30.0)
    try:
        outcome: list = []
        other = Outgoing("", "q", codec.header_payload(commands.Basic.Properties(message_id="m"), 1), b"x", "m",
                         deadline=time.monotonic() + 30.0, done=lambda _m, e: outcome.append(e))
        client.publish(other)  # another thread's send, waiting for the broker
        gone = asyncio.new_event_loop()
        gone.close()  # an asyncio.run() that ended while its send_async waited for room
        client.when_room(1 << 30, lambda: gone.call_soon_threadsafe(lambda: None))
        time.sleep(0.5)
        assert client.alive and not [e for e in outcome if "loop thread failed" in str(e)]
    finally:
        client.close(2.0)


def test_a_closed_sender_does_not_connect_again_for_what_is_left_in_line():
    s, sender, _out, _stats, conn = make()
    s.drain(deque([dl(1, Outcome.DEAD)]), 0.0)  # a copy not yet published (its link is not ready, say)
    sender.ready = False
    opens: list[float] = []
    sender._open = opens.append  # type: ignore[method-assign]
    sender.close(1.0)  # the worker's cold stop
    answer(conn, 0, commands.Connection.CloseOk())
    conn.abort()  # as Connection.on_readable does at close-ok
    for t in (1.1, 1.2, 1.3):
        sender.tick(t)
    assert sender.conn is None and not opens


class _Api:
    """The management API as magne.limits reads it: one policy that caps length without naming an overflow."""

    vhost = "%2F"

    def __init__(self, *_args: object) -> None:
        pass

    def get(self, path: str) -> list[dict]:
        if "operator" in path:
            return []
        return [{"name": "cap", "pattern": ".*", "apply-to": "queues", "priority": 0,
                 "definition": {"max-length": 100_000}}]

    def queue(self, name: str) -> dict:
        return {"name": name, "arguments": topology.queue_arguments(name, "quorum")}  # x-overflow: reject-publish


def test_a_length_policy_over_a_reject_publish_queue_is_not_drop_head(monkeypatch):
    monkeypatch.setattr(limits, "Management", _Api)
    assert topology.queue_arguments("jobs", "quorum")["x-overflow"] == "reject-publish"
    [(queue, how, _where)] = limits.check(parse_url("amqp://127.0.0.1/"), ["jobs"], "http://127.0.0.1:15672")
    assert (queue, how) == ("jobs", "reject-publish")


def test_a_body_larger_than_rabbitmq_can_hold_is_refused_at_its_header():
    p = opened()
    p.call(1, commands.Channel.Open(), (commands.Channel.OpenOk,))
    p.receive(frames(1, commands.Channel.OpenOk()), 1.0)
    deliver = frames(1, commands.Basic.Deliver("ctag", 1, False, "", "q"))
    header = pframe.marshal(pheader.ContentHeader(1, 1 << 40, commands.Basic.Properties()), 1)  # a 1 TiB body
    with pytest.raises(FrameError):
        p.receive(deliver + header, 1.1)


def test_a_header_that_can_never_be_framed_is_a_value_error_before_anything_is_sent():
    pub = Publisher("amqp://guest:guest@127.0.0.1:1/")  # nothing may be sent: no broker needed
    props = commands.Basic.Properties(message_id="m", headers={"h": "y" * 140_000})  # over frame_max 131072
    with pytest.raises(ValueError, match="frame_max") as info:
        pub.publish("q", b"x", props)
    assert not isinstance(info.value, ConnectionLost)
    assert pub._client is None  # refused before a connection was even started


def test_a_link_failure_does_not_send_the_consumer_back_to_the_node_it_lost():
    a, b = parse_url("amqp://127.0.0.1:1/"), parse_url("amqp://127.0.0.2:1/")
    nodes = Nodes([a, b], start=0)  # one Nodes, as IOThread gives its consumer's Reconnector and its link
    consumer = Reconnector(nodes)
    link = Sender(nodes, "unit link", heartbeat=0, follows=True)  # as IOThread makes its link
    link.failed(ConnectionLost("node A went away"), 1.0)  # the link on A notices first
    consumer.failed(ConnectionLost("node A went away"), 1.1, was_open=True)  # then the consumer on A
    assert nodes.current is b  # the consumer's next attempt: not A again


def test_a_new_connection_after_a_polite_close_numbers_publishes_from_1(monkeypatch):
    """The worker's link closes when idle (60 s) and opens again for the next copy: the broker numbers that channel's
    publishes from 1, and so must the tracker, or no confirm matches (the copy waited LINK_STALL, then went twice)."""
    _s, sender, _out, _stats, conn = make()
    got: list = []

    def mk(i: int) -> Outgoing:
        return Outgoing("", f"q{i}", codec.header_payload(commands.Basic.Properties(message_id=f"m{i}"), 1), b"x",
                        f"m{i}", done=lambda m, e: got.append((m.message_id, e)))

    sender.put(mk(0))
    sender.pump(0.0)
    sender._on_frame(PUB, Ack(delivery_tag=1))
    sender._dropped()  # the idle close's close-ok
    monkeypatch.setattr(Connection, "start", lambda self, now: None)
    sender.put(mk(1))
    sender._open(70.0)
    p = sender.conn.protocol
    p.phase = Phase.OPEN
    p._set(PUB, ChannelPhase.OPEN)
    sender.ready = True
    sender.pump(70.0)
    sender._on_frame(PUB, Ack(delivery_tag=1))  # the new channel's first publish
    assert got == [("m0", None), ("m1", None)]
