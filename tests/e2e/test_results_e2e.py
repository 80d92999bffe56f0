"""Results and pipelines on the real broker: a result is read by other processes after the worker stopped,
failures and timeouts say what happened, a pipeline stops at its failing step."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
from types import SimpleNamespace

import pytest

import magne
from magne import chords, publisher, workflow
from magne.publisher import Target
from magne.registry import Task
from magne.steps import Step
from support import ROOT, URL, queue_counts, rabbitmqctl, wait_for
from support.control_env import isolate, own_results_stream
from support.proxy import Proxy


@pytest.fixture
def results(names, broker, pub):
    """This test's own results stream, and `pub` as the default publisher (what task.send and pipelines use)."""
    with own_results_stream(names, broker) as stream:
        broker.track(f"{names['MAGNE_TEST_PREFIX']}.idle")
        old = publisher.set_default(pub)
        prefix = names["MAGNE_TEST_PREFIX"]
        # The tasks of tests/support/results_tasks.py as a sender sees them (its module reads this test's prefix)
        tasks = SimpleNamespace(**{n: Task(print, n, f"{prefix}.main", results=n == "add")
                                   for n in ("add", "mul", "boom", "aadd", "nap")})
        tasks.never = Task(print, "never", f"{prefix}.idle")  # no worker consumes its queue
        # The stream exists and can be read before a worker writes to it: on RabbitMQ 3.10 a publish racing a stream's
        # creation closes the publishing connection (541), which the link survives by publishing again (a duplicate).
        with pytest.raises(magne.ResultTimeout):
            magne.result(workflow.new_id(), 0.1)
        yield {"stream": stream, "env": {"MAGNE_RESULTS_STREAM": stream}, "tasks": tasks}
        publisher.set_default(old)


def read_in_another_process(mid: str, stream: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "MAGNE_URL": URL, "MAGNE_RESULTS_STREAM": stream}
    return subprocess.run([sys.executable, "-m", "magne", "result", mid, "--timeout", "10"], capture_output=True,
                          text=True, timeout=60, env=env, cwd=ROOT)


def test_a_result_is_read_by_other_processes_after_the_worker_stopped(results, start_worker):
    t = results["tasks"]
    w = start_worker(modules=("results_tasks",), env=results["env"])
    w.wait_ready()
    ok = t.add.send(2, 3)
    failed = t.boom.send_with_options(args=(7,), results=True)
    assert magne.result(ok, 20) == 5
    assert asyncio.run(magne.result_async(ok, 5)) == 5
    with pytest.raises(magne.TaskFailed) as info:
        magne.result(failed, 20)
    assert "ValueError: failing on purpose with [7]" in str(info.value) and "Traceback" in info.value.traceback
    assert w.stop() == 0
    for _ in range(2):  # any process, as often as it likes
        got = read_in_another_process(ok, results["stream"])
        assert got.returncode == 0, got.stderr
        assert json.loads(got.stdout) == {"id": ok, "ok": True, "value": 5}
    got = read_in_another_process(failed, results["stream"])
    assert got.returncode == 1 and json.loads(got.stdout)["error"]["type"] == "ValueError"


def test_unknown_task_fails_at_once_and_a_result_never_made_times_out(results, start_worker, names):
    t = results["tasks"]
    w = start_worker(modules=("results_tasks",), env=results["env"])
    w.wait_ready()
    mid = Step(Target("no_such_task", f"{names['MAGNE_TEST_PREFIX']}.main")).send(headers={"x-magne-results": True})
    started = time.monotonic()
    with pytest.raises(magne.TaskFailed, match="unknown task 'no_such_task'"):
        magne.result(mid, 20)
    assert time.monotonic() - started < 5
    never = t.never.send_with_options(args=(1,), results=True)
    started = time.monotonic()
    with pytest.raises(magne.ResultTimeout) as info:
        magne.result(never, 1.0)
    assert isinstance(info.value, TimeoutError) and 0.9 < time.monotonic() - started < 3
    with pytest.raises(magne.ResultTimeout):
        t.nap.call(1.0, timeout=0.3)
    assert t.add.call(20, 22, timeout=20) == 42


def test_a_pipeline_runs_in_order_and_stops_at_its_failing_step(results, start_worker, names):
    t = results["tasks"]
    w = start_worker(modules=("results_tasks",), env=results["env"])
    w.wait_ready()
    assert magne.pipeline([t.add.message(1, 2), t.aadd.message(10), t.mul.message(3)]).call(20) == 39
    pid = magne.pipeline([t.add.message(1, 2), t.boom.message("x"), t.mul.message(3)]).send()
    with pytest.raises(magne.TaskFailed, match=r"boom .*failing on purpose with \['x', 3\]"):
        magne.result(pid, 20)
    assert w.stop() == 0
    c = w.counters()
    assert (c["acked"], c["dead"]) == (4, 1), c  # add, aadd, mul, add; boom: the third step never ran
    assert queue_counts(f"{names['MAGNE_TEST_PREFIX']}.main")[0] == 0


def test_a_chord_fires_once_through_a_kill_9_and_a_cut_connection(results, start_worker, names, redis, pub,
                                                                  monkeypatch):
    """Two workers share a chord of 1,000 members: one is killed (kill -9) in the middle, then every connection of the
    other (consuming, publishing link, the publisher its joins use) is cut. Members run again; the callback is
    published once. Its queue has no consumer until every member settled, and copies of members sent after the set
    was complete (as an at-least-once redelivery would run them) join again: the queue still holds one callback."""
    t = results["tasks"]
    prefix = names["MAGNE_TEST_PREFIX"]
    t.square, t.total = Task(print, "square", t.add.queue), Task(print, "later_total", f"{prefix}.later")
    members: list = []  # the members' messages as published (to send copies of some again)
    publish_many = pub.publish_many

    def keep(msgs):
        members.extend(msgs)
        return publish_many(members)

    monkeypatch.setattr(pub, "publish_many", keep)
    proxy = Proxy()
    only_main = ("--threads", "8", "--queues", t.add.queue)
    a = start_worker(*only_main, modules=("results_tasks",), env=results["env"])
    b = start_worker(*only_main, modules=("results_tasks",), env=results["env"], url=proxy.url())
    a.wait_ready()
    b.wait_ready()
    n = 1000
    started = time.monotonic()
    cid = magne.group([t.square.message(i, 0.01) for i in range(n)]).then(t.total.message(extra=1)).send()
    gid = cid.removesuffix(".callback")
    assert len(members) == n
    magne.result(f"{gid}.300", 20)  # some members are done, most are not
    a.proc.kill()  # its running and prefetched members come back to b, some of them a second time
    assert a.wait() == -9
    magne.result(f"{gid}.600", 20)
    proxy.cut()  # b's unacked members go back, and b reconnects
    assert magne.group_result(gid, 30) == [i * i for i in range(n)]  # the group result is complete
    wait_for(lambda: queue_counts(t.add.queue) == (0, 0), 20, interval=0.3, what="every member settled")
    took = time.monotonic() - started
    publish_many(members[::50]).raise_on_failure()  # 20 members run again after the set was complete
    wait_for(lambda: queue_counts(t.add.queue) == (0, 0), 20, interval=0.3, what="the copies settled")
    assert queue_counts(t.total.queue) == (1, 0)  # the callback, once
    c = start_worker("--queues", t.total.queue, modules=("results_tasks",), env=results["env"])
    assert magne.result(cid, 30) == sum(i * i for i in range(n)) + 1
    gate = chords.gate_queue(gid)  # the callback deleted its gate (not left for a week)
    wait_for(lambda: gate not in rabbitmqctl("list_queues", "name").split(), 10, interval=0.3, what="the gate deleted")
    runs = {k.decode(): int(v) for k, v in redis.hgetall(names["MAGNE_TEST_KEY"]).items()}
    assert runs["square"] > n + 20 and runs["total"] == 1, runs  # members ran again; the callback ran exactly once
    assert took < 20, f"1,000 members through a kill and a cut took {took:.1f}s"
    assert b.stop() == 0 and c.stop() == 0
    counters = b.counters()
    assert counters["dead"] == 0 and counters["redelivered"] > 0 and counters["reconnects"] >= 1, counters
    proxy.close()


def test_a_cancelled_message_that_asked_has_a_result_saying_so(results, start_worker, names, broker, monkeypatch):
    """Issue 23: a cancelled message's result, if it asked for one, says so (it was acked with no record, and a
    reader waited until its timeout)."""
    isolate(names, broker, monkeypatch)
    t = results["tasks"]
    w = start_worker("--threads", "1", modules=("results_tasks",), env=results["env"])
    w.wait_ready()
    running = t.nap.send_with_options(args=(3,), results=True)  # time.sleep ends before the interrupt lands
    waiting = t.nap.send_with_options(args=(0,), results=True)  # behind it on the one thread: cancelled unstarted
    wait_for(lambda: queue_counts(t.nap.queue)[1] == 2, 10, interval=0.05, what="both delivered")
    magne.cancel(running, waiting)
    for mid, why in ((running, "cancelled while running"), (waiting, "cancelled before it started")):
        with pytest.raises(magne.TaskFailed, match=why) as info:
            magne.result(mid, 15)
        assert info.value.reason == "cancelled" and info.value.error_type == "Cancelled" and info.value.task == "nap"


def test_a_new_results_stream_holds_a_marker_before_any_follower_attaches(results, pub):
    """A stream that never held a message resolves a follower's timestamp offset to its end as it attaches (seen on
    RabbitMQ 3.10: a chord whose first members' records another worker's follower never saw): the first reader of a
    stream puts `{}` in it (not a record: readers skip it) before it follows."""
    bodies: list[bytes] = []
    client = pub._running()
    tag = client.consume(results["stream"], lambda m: bodies.append(m.body), 10, {"x-stream-offset": "first"})
    try:
        wait_for(lambda: bodies, 10, what="the stream's first message")
    finally:
        client.cancel(tag)
    assert bodies[0] == b"{}"
