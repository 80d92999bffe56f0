"""The engine client's consumers against the real broker: a queue, a stream read from an offset, a consumer that
survives a connection cut, a refused consume, and acks that never reach a newer channel."""

from __future__ import annotations

import threading

import pytest
from pamqp import commands

from magne.amqp.errors import ChannelClosed
from magne.amqp.url import parse_url
from magne.engine.client import Client
from support import URL, queue_counts, rabbitmqctl, wait_for


@pytest.fixture
def client():
    c = Client(parse_url(URL), "magne test client")
    yield c
    c.close(5.0)


def test_a_consumer_gets_every_message_in_order_and_acks_them(broker, names, client):
    q = names["main"]
    broker.ch.queue_declare(q, durable=True)
    for i in range(50):
        broker.ch.basic_publish("", q, b"%d" % i)
    got: list[bytes] = []

    def on_message(m):
        got.append(m.body)
        client.ack(m.tag, m.gen)

    client.consume(q, on_message, prefetch=10)
    wait_for(lambda: len(got) == 50, 10, what="50 messages")
    assert got == [b"%d" % i for i in range(50)]
    wait_for(lambda: queue_counts(q) == (0, 0), 10, what="every message acked")


def test_a_stream_is_read_from_the_first_offset(broker, names, client):
    s = f"{names['MAGNE_TEST_PREFIX']}.stream"
    broker.track(s)
    broker.ch.queue_declare(s, durable=True, arguments={"x-queue-type": "stream"})
    for i in range(20):
        broker.ch.basic_publish("", s, b"r%d" % i)
    got: list[bytes] = []

    def on_message(m):
        got.append(m.body)
        client.ack(m.tag, m.gen)  # a stream consumer acks to get more credit

    client.consume(s, on_message, prefetch=5, arguments={"x-stream-offset": "first"})
    wait_for(lambda: len(got) >= 20, 10, what="the stream from its start")
    assert got[:20] == [b"r%d" % i for i in range(20)]


def test_consuming_a_queue_that_does_not_exist_is_refused_and_the_client_goes_on(names, client):
    with pytest.raises(ChannelClosed) as info:
        client.consume(f"{names['MAGNE_TEST_PREFIX']}.missing", lambda m: None)
    assert info.value.code == 404
    ok = client.call(commands.Basic.Qos(prefetch_count=1), commands.Basic.QosOk)
    assert isinstance(ok, commands.Basic.QosOk)  # the channel is back


def test_a_consumer_survives_a_cut_connection_and_old_tags_are_never_acked_on_the_new_channel(broker, names, client):
    q = names["main"]
    broker.ch.queue_declare(q, durable=True)
    held: list = []
    lock = threading.Lock()

    def on_message(m):
        with lock:
            held.append(m)

    client.consume(q, on_message, prefetch=5)
    broker.ch.basic_publish("", q, b"before")
    wait_for(lambda: len(held) == 1, 10, what="the first message")
    name = [ln.split("\t")[0] for ln in rabbitmqctl("list_connections", "pid", "client_properties").splitlines()
            if "magne test client (calls)" in ln]
    rabbitmqctl("close_connection", name[0], "test: cut")
    wait_for(lambda: len(held) == 2 and held[1].redelivered, 20, what="the message again on the new channel")
    client.ack(held[0].tag, held[0].gen)  # the old channel's tag: dropped, or the broker would close the channel
    client.ack(held[1].tag, held[1].gen)
    broker.ch.basic_publish("", q, b"after")
    wait_for(lambda: len(held) == 3, 10, what="a message after the cut")
    client.ack(held[2].tag, held[2].gen)
    wait_for(lambda: queue_counts(q) == (0, 0), 10, what="both acked")
