"""A large token pool is filled in one go on the real broker (magne.gate, Client.publish_copies)."""

from __future__ import annotations

import time
import uuid

from pamqp import commands

from magne.amqp import names
from magne.amqp.url import Nodes, parse_urls
from magne.engine.client import Client
from magne.gate import Gate, Limit
from support import URL


def test_a_pool_of_10000_tokens_is_filled_in_seconds_and_exactly_once(broker):
    """One confirmed publish after another took 1.5 ms a token (measured): concurrency=10000 held the gate's only
    thread, every limited queue of the process with it, for 15 s, rate='100000/h' for 150 s."""
    queue = f"magne-test-h5-{uuid.uuid4().hex[:8]}"
    gate = Gate(lambda: client, {queue: Limit(10000)}, {queue: lambda d: None}, lambda d: None)
    pool = gate.queues[queue].cap
    broker.track(pool.tokens, pool.filled)
    client = Client(Nodes(parse_urls(URL)), "magne-test review22 fill")
    try:
        started = time.monotonic()
        assert gate._filled(client, pool) is True
        took = time.monotonic() - started
        assert client.call(names.QueueDeclare(queue=pool.tokens, passive=True), commands.Queue.DeclareOk).message_count == 10000
        assert gate._filled(client, pool) is True  # marked: not filled again
        assert client.call(names.QueueDeclare(queue=pool.tokens, passive=True), commands.Queue.DeclareOk).message_count == 10000
        assert took < 3.0, f"filling 10000 tokens took {took:.2f}s"
    finally:
        client.close(5.0)
