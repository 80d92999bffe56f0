"""Review of issue 21's nested workflows (h5): a chord's callback held by a taker that died while the member that
took it already ran again elsewhere. The broker gives a dead connection's unacked messages back when it handles that
connection's end, per queue: the member's redelivery can come first, and its re-run must not take the gate's
emptiness for "taken" (the callback then waited in its gate forever)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

import magne
from magne import chords, publisher, workflow
from magne.publisher import Publisher
from magne.registry import Task
from support import URL, queue_counts, wait_for
from support.control_env import own_results_stream


@pytest.fixture
def flows(names, broker, pub):
    prefix = names["MAGNE_TEST_PREFIX"]
    with own_results_stream(names, broker) as stream:
        old = publisher.set_default(pub)
        tasks = SimpleNamespace(**{n: Task(print, n, f"{prefix}.main") for n in ("add", "total")})
        with pytest.raises(magne.ResultTimeout):  # the stream exists before a worker writes to it (RabbitMQ 3.10, 541)
            magne.result(workflow.new_id(), 0.1)
        yield SimpleNamespace(t=tasks, env={"MAGNE_RESULTS_STREAM": stream}, queue=f"{prefix}.main")
        publisher.set_default(old)


def test_a_member_run_again_takes_the_callback_its_dead_taker_held(flows, start_worker, names):
    t = flows.t
    cid = magne.group([t.add.message(1, 2)]).then(t.total.message(extra=10)).send()
    gid = cid.removesuffix(".callback")
    gate = chords.gate_queue(gid)
    # The member's first run, and its take of the callback, on two connections of a worker about to die: the member
    # comes back (redelivered) when the first closes; the callback stays held until the second closes.
    runner, taker = Publisher(URL), Publisher(URL)
    try:
        assert runner._running().get(flows.queue) is not None
        assert taker._running().get(gate) is not None
        runner.close()
        w = start_worker("--threads", "2", modules=("nesting_tasks",), env=flows.env)
        w.wait_ready()
        assert magne.result(f"{gid}.0", 20) == 3  # the re-run joined: its record completes the group
        # it finds the gate empty (the callback is held): it looks again (new), or it was acked (before: lost)
        wait_for(lambda: w.events("chord_gate_empty") or queue_counts(flows.queue) == (0, 0), 20, interval=0.1,
                 what="the member's re-run found the gate empty")
    finally:
        taker.close()  # the dead taker's connection ends: the callback is back in its gate
    assert magne.result(cid, 15) == 13  # the re-run took it: the callback ran
    assert w.stop() == 0
    assert w.counters()["redelivered"] == 1
