"""Regression tests from the review of issue 22 that need the real broker's own behaviour."""

from __future__ import annotations

import datetime as dt
import uuid

from pamqp import commands

from magne.amqp import codec, names
from magne.amqp.url import Nodes, parse_urls
from magne.engine.client import Client
from magne.leader import last_ticks, stream_declaration
from magne.schedule import UTC, tick_id
from support import URL


def test_a_call_right_after_reading_the_schedule_streams_tail_keeps_the_connection(broker):
    """RabbitMQ answers a stream consumer's basic.cancel after the replies to methods sent later: the passive
    declare that followed last_ticks (a leader's next declaration, magne status) got its declare-ok where the
    session waited for the cancel-ok, a ProtocolError that dropped the connection (and the leader's take-over)."""
    stream = f"magne-test-h5-{uuid.uuid4().hex[:8]}.schedule"
    broker.track(stream)
    client = Client(Nodes(parse_urls(URL)), "magne-test review22")
    try:
        client.call(stream_declaration(stream), commands.Queue.DeclareOk)
        due = dt.datetime(2026, 1, 1, tzinfo=UTC)
        for i in range(50):
            mid = tick_id("t", due + dt.timedelta(seconds=i))
            client.publish_confirmed("", stream, b"", codec.header_payload(commands.Basic.Properties(message_id=mid), 0))
        conn = client.session.conn
        for _ in range(3):
            found = last_ticks(client, stream, dt.datetime.now(UTC) - dt.timedelta(minutes=5))
            assert found["t"][0] == due + dt.timedelta(seconds=49)
            client.call(names.QueueDeclare(queue=stream, passive=True), commands.Queue.DeclareOk)
        assert client.session.conn is conn  # not reconnected after a ProtocolError
    finally:
        client.close(5.0)
