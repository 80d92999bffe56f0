"""Review of issue 24 (running dramatiq and celery messages) on the real broker: what only the broker can show."""

from __future__ import annotations

import dramatiq
from dramatiq.brokers.rabbitmq import RabbitmqBroker

from support import URL, queue_counts


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
