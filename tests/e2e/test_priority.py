"""Priorities on the real broker: @task(max_priority=N) declares x-max-priority, and a worker with a small
prefetch runs the higher-priority messages first."""

from __future__ import annotations

import pika

from magne import wire
from support import wait_for


def test_higher_priority_messages_run_first(broker, redis, names, start_worker):
    q = f"{names['MAGNE_TEST_PREFIX']}.prio"
    broker.track(q)
    order_key = f"{names['MAGNE_TEST_PREFIX']}:order"
    w = start_worker(modules=("priority_tasks",))
    w.wait_ready()  # declares the queue with x-max-priority 10 (a redeclare without it would be a 406)
    assert w.stop() == 0
    for i in range(20):
        broker.publish(q, q, wire.encode("ordered", [f"low-{i}"]), priority=1)
    for i in range(20):
        broker.publish(q, q, wire.encode("ordered", [f"high-{i}"]), priority=9)
    w2 = start_worker("--threads", "1", "--prefetch", "1", modules=("priority_tasks",))
    w2.wait_ready()
    try:
        wait_for(lambda: redis.llen(order_key) == 40, 30, what="all 40 messages to run")
        order = [x.decode() for x in redis.lrange(order_key, 0, -1)]
        assert all(x.startswith("high") for x in order[:20]), order
    finally:
        redis.delete(order_key)
    # pika sees the argument the worker declared
    ch = broker.conn.channel()
    try:
        ch.queue_declare(q, durable=True, arguments={"x-max-priority": 10})  # same arguments: no 406
    except pika.exceptions.ChannelClosedByBroker as exc:
        raise AssertionError(f"the worker declared other arguments: {exc}") from None
