"""Review of issue 21's results and workflows: engine-level findings (the session's consumers after a reconnect)."""

from __future__ import annotations

from types import SimpleNamespace

from pamqp import commands

from magne.amqp.errors import ConnectionLost
from magne.amqp.url import Nodes, parse_url
from magne.engine.session import Call, Session, Subscription


def _session() -> tuple[Session, list[tuple[object, object]]]:
    session = Session(Nodes([parse_url("amqp://guest:guest@127.0.0.1:1/")]), "unit calls", None)
    calls: list[tuple[object, object]] = []
    session.conn = SimpleNamespace(call=lambda ch, method, replies, cb=None: calls.append((method, cb)),
                                   send=lambda ch, *m: None)
    session.reconnector = SimpleNamespace(opened=lambda now: None)
    return session, calls


def test_consumers_are_subscribed_again_one_at_a_time_after_a_reconnect():
    """A stream's consume-ok comes asynchronously (RabbitMQ 3.10): the basic.qos-ok of the next consumer, pipelined
    after it, overtook it, a ProtocolError dropped the connection, and the next reconnect did the same: a client with
    a stream consumer and another (a worker's cancels, control queue and results follower) never came back, and
    every chord member waited for its own record until it timed out."""
    session, calls = _session()
    for tag, queue, args in (("c1", "cancels", {"x-stream-offset": 9}), ("c2", "control", {}),
                             ("c3", "results", {"x-stream-offset": 10})):
        session.subs[tag] = Subscription(tag, queue, lambda m: None, arguments=args)
    session.waiting.append(Call(commands.Queue.Declare(queue="q"), (commands.Queue.DeclareOk,)))
    session._ready(None)
    assert [type(m).__name__ for m, _ in calls] == ["Qos", "BasicConsume"]  # nothing after a consume until its consume-ok
    calls.pop()[1](commands.Basic.ConsumeOk(consumer_tag="c1"))
    assert [getattr(m, "queue", None) for m, _ in calls[1:]] == [None, "control"]
    calls.pop()[1](commands.Basic.ConsumeOk(consumer_tag="c2"))
    calls.pop()[1](commands.Basic.ConsumeOk(consumer_tag="c3"))
    assert type(calls[-1][0]).__name__ == "Declare" and not session.unconfirmed  # then the calls waiting
    assert session.consuming is None


def test_a_lost_connection_while_a_consume_is_awaited_does_not_block_the_next_channel():
    session, calls = _session()
    session.subs["c1"] = Subscription("c1", "s", lambda m: None, arguments={"x-stream-offset": 1})
    session.subs["c2"] = Subscription("c2", "q", lambda m: None)
    session._ready(None)
    assert session.consuming == "c1" and len(session.queued) == 1
    session.reconnector = SimpleNamespace(failed=lambda exc, now, x: (1.0, False), opened=lambda now: None)
    session.conn.abort = lambda: None
    session.failed(ConnectionLost("cut"), 0.0)
    assert session.consuming is None and not session.queued


def test_a_consumer_cancelled_while_it_waits_its_turn_is_not_subscribed():
    session, calls = _session()
    session.subs["c1"] = Subscription("c1", "s", lambda m: None, arguments={"x-stream-offset": 1})
    session.subs["c2"] = Subscription("c2", "q", lambda m: None)
    session._ready(None)
    session.unsubscribe("c2")
    calls.pop()[1](commands.Basic.ConsumeOk(consumer_tag="c1"))
    assert [type(m).__name__ for m, _ in calls] == ["Qos"] and not session.unconfirmed and session.consuming is None
