"""Real faults while `async def` tasks run on the worker's event loop: the worker killed, the connection cut or
stalled. Nothing may be lost; duplicates only from what was in flight, and counted.

Like tests/faults/test_faults.py, each test prints a line `FAULT <name>: ...` with its figures.
"""

from __future__ import annotations

import signal
import time

from magne import wire
from support import URL, channels_of, connections_of, queue_counts, runs, wait_for

N = 600
CONCURRENCY = 20
PREFETCH = CONCURRENCY + CONCURRENCY // 4  # an async-only queue's prefetch (magne.queueplan.async_prefetch)
SLEEP = 0.2  # 20 places x 0.2 s: about 100 tasks/s, so the fault lands mid-stream


def start(start_worker, aq, url, queue="aio", *args):
    w = start_worker("--async-concurrency", str(CONCURRENCY), "--threads", "4", *args, "--queues", aq[queue],
                     modules=("async_tasks",), url=url)
    w.wait_ready()
    return w


def load(broker, queue, n=N, funcs=("a_record",)):
    for i in range(n):
        func = funcs[i % len(funcs)]
        args = [i, 0.02 if func == "m_sync" else SLEEP]
        broker.publish(queue, queue, wire.encode(func, args, None, wire.new_id()))


def check_after_fault(name, w, redis, names, queue, t_fault, n=N, in_flight=PREFETCH):
    wait_for(lambda: len(runs(redis, names)) == n, 60, interval=0.1, what=f"all {n} tasks after {name}")
    t_done = time.monotonic()
    wait_for(lambda: queue_counts(queue) == (0, 0), 30, interval=0.3, what="queue empty, nothing unacked")
    done = runs(redis, names)
    dups = sum(v - 1 for v in done.values())
    assert dups <= in_flight, f"{dups} duplicates: more than were in flight at the fault"
    assert w.proc.poll() is None, "the worker must recover without a restart"
    wait_for(lambda: w.events("reconnected"), 10, what="the worker's reconnected record")
    assert len(connections_of(w.pid)) == 1
    assert channels_of(w.pid) == 1
    assert w.stop() == 0
    counters = w.counters()
    assert dups <= counters["redelivered"], "a task may only run twice if the broker redelivered it"
    assert not [r for r in w.records() if "raw" in r], [r["raw"] for r in w.records() if "raw" in r][:3]
    print(f"\nFAULT {name}: messages={n} duplicates={dups} redelivered={counters['redelivered']} "
          f"stale-outcomes={counters['stale']} all-done-after={t_done - t_fault:.1f}s")


def test_kill_9_while_coroutines_run_loses_nothing(broker, redis, names, aq, start_worker):
    q = aq["aio"]
    w = start(start_worker, aq, URL)
    load(broker, q)
    wait_for(lambda: len(runs(redis, names)) >= N // 4, 30, what="progress before the kill")
    assert queue_counts(q)[1] > 0, "coroutines are running at the kill"
    t = time.monotonic()
    w.signal(signal.SIGKILL)
    w.wait(10)
    wait_for(lambda: queue_counts(q)[1] == 0, 10, interval=0.2, what="the broker to take the unacked back")
    w2 = start(start_worker, aq, URL)
    wait_for(lambda: len(runs(redis, names)) == N, 30, interval=0.1, what="a fresh worker to finish the rest")
    wait_for(lambda: queue_counts(q) == (0, 0), 30, interval=0.3, what="queue empty")
    done = runs(redis, names)
    assert min(done.values()) >= 1
    dups = sum(v - 1 for v in done.values())
    assert dups <= PREFETCH, f"{dups} duplicates: more than were in flight at the kill"
    assert w2.stop() == 0
    assert w2.counters()["redelivered"] >= 1
    print(f"\nFAULT kill -9 with coroutines running: messages={N} duplicates={dups} "
          f"all done {time.monotonic() - t:.1f}s after the kill (by a fresh worker)")


def test_connection_cut_while_coroutines_run(broker, redis, names, aq, start_worker, proxy):
    q = aq["aio"]
    w = start(start_worker, aq, proxy.url("?heartbeat=2"))
    load(broker, q)
    wait_for(lambda: len(runs(redis, names)) >= N // 4, 30, what="progress before the cut")
    t = time.monotonic()
    proxy.cut()
    check_after_fault("connection cut with coroutines running", w, redis, names, q, t)


def test_connection_cut_on_a_mixed_queue(broker, redis, names, aq, start_worker, proxy):
    """The pool hands async tasks over to the loop: deliveries of the old channel still in hand at the cut must
    neither be acked on the new channel nor lost."""
    q = aq["mixed"]
    w = start(start_worker, aq, proxy.url("?heartbeat=2"), "mixed")
    load(broker, q, funcs=("m_sync", "m_async"))
    wait_for(lambda: len(runs(redis, names)) >= N // 4, 30, what="progress before the cut")
    t = time.monotonic()
    proxy.cut()
    # A mixed queue's prefetch is the threads' and the loop's together (magne.worker).
    check_after_fault("connection cut on a mixed queue", w, redis, names, q, t, in_flight=8 + PREFETCH)


def test_connection_stalled_while_coroutines_run_is_caught_by_heartbeats(broker, redis, names, aq, start_worker,
                                                                          proxy):
    q = aq["aio"]
    w = start(start_worker, aq, proxy.url("?heartbeat=1"))
    load(broker, q)
    wait_for(lambda: len(runs(redis, names)) >= N // 4, 30, what="progress before the stall")
    t = time.monotonic()
    proxy.stall()
    # the consuming connection's loss (the control plane's connections notice the stall too, on their own)
    wait_for(lambda: any("missed heartbeats" in str(r.get("message")) for r in w.events("connection_lost")), 15,
             what="the worker to notice missed heartbeats")
    proxy.resume()
    check_after_fault("connection stalled with coroutines running (heartbeat=1s)", w, redis, names, q, t)
