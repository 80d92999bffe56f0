"""Review of issue 24 (running dramatiq and celery messages) on the real broker: what only the broker can show."""

from __future__ import annotations

import types

import dramatiq
from dramatiq.brokers.rabbitmq import RabbitmqBroker

from support import URL, queue_counts, runs, wait_for


def test_a_dramatiq_queue_with_other_arguments_is_explained_not_to_be_deleted(broker, names, start_worker):
    """dramatiq's broker with max_priority declares x-max-priority; a magne task without it gets a 406 at start-up.
    The hint said "was it declared as another queue type? ... or delete the queue" (with the producers' messages)."""
    dram = f"{names['MAGNE_TEST_PREFIX']}.dram"  # tests/support/migration_tasks.py's dramatiq queue
    broker.track(dram)
    broker.track_prefix(names["MAGNE_TEST_PREFIX"])
    rb = RabbitmqBroker(url=URL, max_priority=10)
    try:
        dramatiq.actor(lambda: None, actor_name="mig.record", queue_name=dram, broker=rb).send()
    finally:
        rb.close()
    w = start_worker("--accept", "dramatiq", "--queues", dram, modules=("migration_tasks",))
    assert w.wait(30) != 0
    log = w.log()
    assert "inequivalent arg 'x-max-priority'" in log and "@task(max_priority=...)" in log, log
    assert "or delete the queue" not in log and "another queue type" not in log, log
    assert queue_counts(dram) == (1, 0)  # the producer's message is still there


def test_producers_moved_to_magne_send_into_a_dramatiq_queue_as_the_docs_say(broker, redis, names, pub,
                                                                             start_worker):
    """docs/migration.md step 5 said `task.send(...)`, which declares the queue with magne's arguments and is refused
    (406 inequivalent arg 'x-dead-letter-exchange'); the page now says to send with declare=False. Plain and delayed
    magne messages then run beside dramatiq's in the same queue."""
    dram = f"{names['MAGNE_TEST_PREFIX']}.dram"
    broker.track(dram)
    broker.track_prefix(names["MAGNE_TEST_PREFIX"])
    rb = RabbitmqBroker(url=URL)
    try:
        dramatiq.actor(lambda n: None, actor_name="mig.record", queue_name=dram, broker=rb).send(1)
    finally:
        rb.close()
    w = start_worker("--accept", "dramatiq", "--queues", dram, modules=("migration_tasks",))
    w.wait_ready()
    record = types.SimpleNamespace(name="mig.record", queue=dram, queue_type=None)
    pub.send(record, (2,), declare=False)
    pub.send(record, (3,), delay=0.5, declare=False)
    wait_for(lambda: runs(redis, names) == {"1": 1, "2": 1, "3": 1}, 15, what="the dramatiq and magne messages")
