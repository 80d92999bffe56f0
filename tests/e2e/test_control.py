"""Cancel and inspect on the real broker (magne.cancel, magne.control): a cancel reaches a message wherever it waits
(its queue, a delay queue, a worker's prefetch), survives every worker being down, interrupts a running task without
a retry; inspect hears every live process and nothing from a killed one."""

from __future__ import annotations

import signal
import time

import pytest

import magne
from magne import cancels, control, events
from magne.outgoing import Target
from support import wait_for
from support.control_env import isolate

MODULES = ("control_tasks",)


@pytest.fixture
def fleet(names, broker, monkeypatch):
    """Per-test cancels and events streams and control exchange, for this process and the workers."""
    return isolate(names, broker, monkeypatch)


def counts(redis, names, key):
    return {k.decode(): int(v) for k, v in redis.hgetall(f"{names['MAGNE_TEST_PREFIX']}:{key}").items()}


def test_cancels_reach_queued_delayed_prefetched_and_running_messages_even_with_every_worker_down(
        fleet, redis, pub, start_worker):
    main = Target("note", fleet["main"])
    nap = Target("nap", fleet["main"])
    # No worker is up: one message waits in its queue, one in a delay queue; both are cancelled.
    queued = pub.send(main, [1])
    delayed = pub.send(main, [2], delay=1.5)
    pub.send(main, [3])
    assert magne.cancel(queued, delayed, publisher=pub) == [queued, delayed]
    w = start_worker("--threads", "1", "--max-retries", "3", "--min-backoff", "0.1", modules=MODULES)
    w.wait_ready()
    # One thread: a long task runs, the next message waits prefetched behind it; cancel both.
    running = pub.send(nap, [4, 30])
    wait_for(lambda: counts(redis, fleet, "started").get("4") == 1, 10, what="the long task started")
    prefetched = pub.send(main, [5])
    cancels.cancel(prefetched, publisher=pub)
    cancels.cancel(running, publisher=pub)
    wait_for(lambda: len(w.events("cancelled")) == 4, 15, what=f"four cancels honoured:\n{w.log()}")
    pub.send(main, [6])
    wait_for(lambda: counts(redis, fleet, "runs").get("6") == 1, 10, what="a message after the cancels ran")
    runs = counts(redis, fleet, "runs")
    assert runs == {"3": 1, "6": 1}, runs  # 1, 2 and 5 never ran; 4 was cut before its end
    assert counts(redis, fleet, "started") == {"4": 1}  # cancelled, not retried
    ids = {e["message_id"] for e in w.events("cancelled")}
    assert ids == {queued, delayed, prefetched, running}
    assert [e for e in w.events("cancel_running")][0]["task"] == "nap"
    assert w.stop() == 0
    assert w.counters()["dead"] == 0 and w.counters()["retried"] == 0
    # Every outcome is in the events stream, cancels as cancels.
    got: list[dict] = []
    events.follow(pub._running(), got.extend, time.time() - 60)
    wait_for(lambda: len(got) >= 6, 10, what=f"six events: {got}")
    by_id = {e["id"]: e for e in got}
    assert {by_id[m]["event"] for m in (queued, delayed, prefetched, running)} == {"cancelled"}
    assert by_id[running]["duration"] > 0 and "started" not in by_id[queued]
    assert sorted(e["event"] for e in got) == ["cancelled"] * 4 + ["succeeded"] * 2
    assert {e["pid"] for e in got} == {w.pid} and {e["queue"] for e in got} == {fleet["main"]}


def test_a_running_async_task_is_cancelled_and_not_retried(fleet, redis, pub, start_worker):
    w = start_worker("--max-retries", "3", "--min-backoff", "0.1", modules=MODULES)
    w.wait_ready()
    mid = pub.send(Target("a_nap", f"{fleet['MAGNE_TEST_PREFIX']}.async"), [7, 30])
    wait_for(lambda: counts(redis, fleet, "started").get("7") == 1, 10, what="the coroutine started")
    cancels.cancel(mid, publisher=pub)
    wait_for(lambda: w.events("cancelled"), 10, what=f"the coroutine cancelled:\n{w.log()}")
    assert w.events("cancelled")[0]["message_id"] == mid
    assert w.stop() == 0
    assert counts(redis, fleet, "runs") == {} and counts(redis, fleet, "started") == {"7": 1}


def test_inspect_hears_every_live_process_and_what_it_runs_and_nothing_from_a_killed_one(
        fleet, redis, pub, start_worker):
    a = start_worker("--threads", "2", modules=MODULES)
    b = start_worker("--threads", "3", modules=MODULES)
    a.wait_ready()
    b.wait_ready()
    mid = pub.send(Target("nap", fleet["main"]), [8, 20])
    try:
        inspect_two_then_one(fleet, redis, pub, a, b, mid)
    finally:
        cancels.cancel(mid, publisher=pub)  # the survivor stops at once


def inspect_two_then_one(fleet, redis, pub, a, b, mid):
    wait_for(lambda: counts(redis, fleet, "started").get("8") == 1, 10, what="the task started")
    replies = control.gather(pub, 1.0)
    assert sorted(r["pid"] for r in replies) == sorted([a.pid, b.pid])
    assert sorted(r["threads"] for r in replies) == [2, 3]
    running = [t for r in replies for t in r["running"]]
    assert [(t["task"], t["message_id"], t["time_limit"]) for t in running] == [("nap", mid, 600.0)]
    queues = sorted([fleet["main"], f"{fleet['MAGNE_TEST_PREFIX']}.async"])
    assert all(sorted(r["queues"]) == queues and r["uptime"] >= 0 and r["host"] for r in replies)
    victim = next(p for p in (a, b) if p.pid != next(r["pid"] for r in replies if r["running"]))
    victim.signal(signal.SIGKILL)
    victim.wait(10)
    replies = control.gather(pub, 1.0)
    assert [r["pid"] for r in replies] == [({a.pid, b.pid} - {victim.pid}).pop()]
