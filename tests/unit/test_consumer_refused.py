"""A consumer refused when subscribed again after a reconnect takes only itself down, not those queued behind it.

Found on the 3-node cluster (tests/cluster: results through the loss of a node): a worker's default publisher holds
its control queue's consumer and the results follower. After its node stopped, the control queue (a classic queue
whose home node was down) was refused with a 404, which closes the channel; every consumer still waiting its turn
behind it was dropped too, with no log: the results follower was gone, and every chord member waited for its own
record until it timed out, ran again and waited again."""

from __future__ import annotations

from types import SimpleNamespace

from pamqp import commands

from magne.amqp.errors import ChannelClosed
from magne.amqp.url import Nodes, parse_url
from magne.engine.session import Session, Subscription


def test_a_refused_consume_drops_itself_and_the_next_ones_are_subscribed_again():
    session = Session(Nodes([parse_url("amqp://guest:guest@127.0.0.1:1/")]), "unit calls", None)
    calls: list[tuple[object, object]] = []
    session.conn = SimpleNamespace(call=lambda ch, method, replies, cb=None: calls.append((method, cb)),
                                   send=lambda ch, *m: None)
    session.reconnector = SimpleNamespace(opened=lambda now: None)
    cancelled: list[str] = []
    session.subs["c1"] = Subscription("c1", "control", lambda m: None, on_cancel=lambda: cancelled.append("c1"))
    session.subs["c2"] = Subscription("c2", "results", lambda m: None, arguments={"x-stream-offset": 5},
                                      on_cancel=lambda: cancelled.append("c2"))
    session._ready(None)
    assert [getattr(m, "queue", None) for m, _ in calls] == [None, "control"]  # c2 waits its turn
    session._channel_closed(1, ChannelClosed(1, 404, "home node of durable queue 'control' is down"))
    assert cancelled == ["c1"] and list(session.subs) == ["c2"]  # the refused one only
    calls.clear()
    session._ready(None)  # the channel is open again (Channel.OpenOk)
    assert [getattr(m, "queue", None) for m, _ in calls] == [None, "results"]
    calls.pop()[1](commands.Basic.ConsumeOk(consumer_tag="c2"))
    assert not session.unconfirmed and session.consuming is None
