"""Review of the engine (issue 19) against the real broker: paths where a message is reported taken although the
broker returned it as unroutable.

Every queue is unique to the test (magne-test-...) and deleted at the end by the `broker` fixture.
"""

from __future__ import annotations

import asyncio
import time
import warnings

import pytest
from pamqp import commands

from magne.amqp.confirms import Returned
from magne.amqp.errors import PublishError
from magne.amqp.url import parse_url
from magne.dead import dead_replay
from magne.engine.client import Client
from magne.publisher import Publisher, Target
from support import URL, queue_counts, wait_for


def test_an_unroutable_publish_without_a_message_id_raises_returned(broker, names, pub):
    props = commands.Basic.Properties(delivery_mode=2)  # no message_id: publish() takes any properties
    with pytest.raises(Returned):
        pub.publish("no-such-binding", b"lost", props, exchange="amq.direct")


def test_dead_replay_into_a_missing_task_queue_keeps_the_dead_letter(broker, names):
    q = names["main"]  # never declared: no worker ever ran for it (or it was deleted)
    dq = q + ".dead"
    broker.ch.queue_declare(dq, durable=True)
    broker.publish("", dq, b'{"func":"t","args":[],"kwargs":{}}', message_id="dead-1")
    with pytest.raises(PublishError):
        dead_replay(URL, q)
    assert broker.ready(dq) == 1  # the dead letter stays where it was


def test_send_async_handed_to_a_client_that_just_ended_does_not_hang(broker, names, pub, monkeypatch):
    real = Client.publish
    raced: list[bool] = []

    def publish(self: Client, msg) -> None:
        if not raced:
            raced.append(True)
            self.close()  # another thread's Publisher.close() ends the loop between _running() and the hand-over
        real(self, msg)

    monkeypatch.setattr(Client, "publish", publish)
    pub._running()  # the client the coroutine will find

    async def send() -> str:
        return await asyncio.wait_for(pub.send_async(Target("t", names["main"]), [1]), 10)

    asyncio.run(send())
    assert broker.ready(names["main"]) == 1


def _ready(queue: str) -> int:
    try:
        return queue_counts(queue)[0]
    except AssertionError:  # not declared (yet)
        return 0


def test_send_async_hands_the_message_over_at_the_call(broker, names, pub):
    q = names["main"]

    async def handler() -> None:
        pub.send_async(Target("t", q), [1])  # fire and forget: the outcome is not awaited
        await asyncio.sleep(0.5)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # "coroutine ... was never awaited"
        asyncio.run(handler())
    wait_for(lambda: _ready(q) == 1, 10, interval=0.5, what="the message in its queue")


def test_a_call_that_cannot_be_encoded_fails_alone_and_the_client_goes_on(broker, names):
    client = Client(parse_url(URL), "review client", timeout=5.0).open()
    try:
        bad = commands.Queue.Declare(queue=names["main"], passive=True, arguments={"x-bad": object()})
        with pytest.raises(TypeError):
            client.call(bad, commands.Queue.DeclareOk)
        assert client.alive
        broker.ch.queue_declare(names["main"], durable=True)
        assert client.queue_counts(names["main"]) == (0, 0)
    finally:
        client.close(5.0)


def test_a_send_after_the_idle_close_is_confirmed(broker, names):
    pub = Publisher(URL, confirm_timeout=5.0)
    try:
        task = Target("t", names["main"])
        pub.send(task, [0])
        client = pub._running()
        client.sender.idle_close = 0.5  # IDLE_CLOSE is 60 s
        wait_for(lambda: client.sender.conn is None, 10, what="the idle close")
        pub.send(task, [1])
        assert broker.ready(names["main"]) == 2
    finally:
        pub.close()


def test_a_message_handed_to_a_closing_client_is_still_sent(broker, names):
    """Sender.close() keeps a worker's link closed at a stop; a client that is closing still sends what it is handed
    (it ends only once nothing is pending)."""
    pub = Publisher(URL, confirm_timeout=10.0)
    try:
        task = Target("t", names["main"])
        pub.send(task, [0])
        client = pub._running()
        client.submit(lambda: client.sender.close(time.monotonic()))  # what the client's stop does first
        wait_for(lambda: client.sender.conn is None, 10, what="the sender's connection to close")
        pub.send(task, [1])  # another thread's send, handed to the client that is closing
        assert broker.ready(names["main"]) == 2
    finally:
        pub.close()

