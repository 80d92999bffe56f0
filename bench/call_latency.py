"""The results workload's round trip: `task.call` of a task that sleeps `body` seconds, one call at a time.

A magne worker (8 threads, bench/tasks_results.py) runs; this process calls the task N times in a row through its
default publisher and reads each result from the results stream (magne.result). Latency minus the body's own time
is magne's overhead: the send (confirmed), the delivery, the result record (confirmed) and the stream read.
"""

from __future__ import annotations

import statistics
import subprocess
import time

import pika

from bench.measure import URL, Result, queue_state, stop
from bench.peers import PY, clean_env

BODIES = {"call-0ms": 0.0, "call-10ms": 0.01}
WARM_UP = 20


def run_call(name: str, n: int, run: int) -> Result:
    """One run: a fresh worker, WARM_UP calls untimed, then n calls timed one by one; p50/p99 in milliseconds."""
    from bench.tasks_results import CALL_Q as Q
    from bench.tasks_results import STREAM
    from magne import publisher, workflow
    from magne.publisher import Publisher
    from magne.registry import Task

    body = BODIES[name]
    res = Result("results", name, "default", run, n)
    conn = pika.BlockingConnection(pika.URLParameters(URL))
    ch = conn.channel()
    for q in (Q, Q + ".dead", Q + ".due"):
        ch.queue_delete(q)
    conn.close()
    env = {**clean_env(), "MAGNE_RESULTS_STREAM": STREAM}
    proc = subprocess.Popen([PY, "-m", "magne", "--log-level", "warning", "worker", "bench.tasks_results",
                             "--threads", "8", "--queues", Q], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    workflow.configure(stream=STREAM)
    pub = Publisher(URL)
    old = publisher.set_default(pub)
    try:
        deadline = time.monotonic() + 60
        while queue_state(Q)[0] < 0 or _consumers(Q) == 0:
            if time.monotonic() > deadline or proc.poll() is not None:
                res.note = "the worker did not start"
                return res
            time.sleep(0.1)
        task = Task(print, "sleep_return", Q)
        for _ in range(WARM_UP):
            task.call(body, timeout=30)
        lat = []
        t0 = time.perf_counter()
        for _ in range(n):
            t = time.perf_counter()
            task.call(body, timeout=30)
            lat.append(time.perf_counter() - t)
        res.elapsed = time.perf_counter() - t0
        res.rate = n / res.elapsed
        lat.sort()
        res.p50_ms = statistics.median(lat) * 1000
        res.p99_ms = lat[min(n - 1, int(n * 0.99))] * 1000
        res.body_ms = body * 1000
        res.ok = True
    finally:
        publisher.set_default(old)
        pub.close()
        stop(proc)
    res.connections = res.channels = 0
    res.left_ready, res.left_unacked = queue_state(Q)
    return res


def _consumers(queue: str) -> int:
    conn = pika.BlockingConnection(pika.URLParameters(URL))
    try:
        return conn.channel().queue_declare(queue, passive=True).method.consumer_count
    finally:
        conn.close()

