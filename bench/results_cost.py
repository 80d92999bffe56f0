"""python -m bench.results_cost [N] [worker options]: what `results=True` costs per task, and task.call's round trip.

The same worker (8 threads) drains N preloaded messages of a task that increments a Redis counter, with and
without the x-magne-results header, alternating, 3 runs each (docs/results.md quotes the medians); then 200
`task.call`s of a task that returns at once, and 50 of a 10 ms task. Needs RabbitMQ (MAGNE_URL) and Redis on
127.0.0.1:6379; its queues and stream are named after a random prefix and deleted at the end.
"""

from __future__ import annotations

import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import redis
from pamqp import commands

from magne import publisher, wire, workflow
from magne.amqp import names
from magne.publisher import Message, Publisher
from magne.registry import Task

PREFIX = "bench-results-" + os.urandom(3).hex()
Q, KEY, STREAM = PREFIX, PREFIX + ":n", PREFIX + ".results"
TASKS = f'''
import os, time
import redis
from magne import task
r = redis.Redis(host="127.0.0.1", port=6379)

@task(name="bincr", queue="{Q}")
def bincr():
    r.incr("{KEY}")

@task(name="bsleep", queue="{Q}.lat")
def bsleep(s):
    time.sleep(s)
    return s
'''


def worker(tmp: Path, *args: str) -> subprocess.Popen[str]:
    env = {**os.environ, "PYTHONPATH": str(tmp), "MAGNE_RESULTS_STREAM": STREAM}
    w = subprocess.Popen([sys.executable, "-m", "magne", "--log-format", "json", "worker", "bench_results_tasks",
                          "--threads", "8", *args], env=env, cwd=tmp, stdout=subprocess.PIPE,
                         stderr=subprocess.STDOUT, text=True)
    assert w.stdout is not None
    for line in w.stdout:
        if '"ready"' in line:
            return w
    raise SystemExit("the worker did not start")


def drain(pub: Publisher, r: redis.Redis, tmp: Path, n: int, results: bool, extra: list[str]) -> float:
    """Seconds from the worker's ready to the n-th run, every message preloaded; waits until the queue is empty."""
    r.set(KEY, 0)
    msgs = []
    for _ in range(n):
        mid = workflow.new_id()
        props = wire.properties_for(mid)
        props.headers = {wire.RESULTS_HEADER: True} if results else None
        msgs.append(Message(Q, wire.encode("bincr", [], None, mid), props))
    pub.publish_many(msgs).raise_on_failure()
    w = worker(tmp, *extra)
    t0 = time.perf_counter()
    while int(r.get(KEY) or 0) < n:
        time.sleep(0.002)
    took = time.perf_counter() - t0
    client = pub._running()
    while client.queue_counts(Q)[0]:
        time.sleep(0.05)
    w.terminate()
    w.wait()
    return took


def main() -> None:
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 20000
    extra = sys.argv[2:]
    tmp = Path(tempfile.mkdtemp(prefix=PREFIX))
    (tmp / "bench_results_tasks.py").write_text(TASKS)
    workflow.configure(stream=STREAM)
    pub = Publisher()
    publisher.set_default(pub)
    r = redis.Redis(host="127.0.0.1", port=6379)
    try:
        runs: dict[bool, list[float]] = {False: [], True: []}
        for _ in range(3):
            for flag in (False, True):
                runs[flag].append(drain(pub, r, tmp, n, flag, extra))
        for flag in (False, True):
            med = statistics.median(runs[flag])
            print(f"results={flag}: {n / med:,.0f} tasks/s ({med / n * 1e6:.0f} us per task; runs {runs[flag]})")
        cost = statistics.median(runs[True]) - statistics.median(runs[False])
        print(f"results=True costs {cost / n * 1e6:+.0f} us per task")
        w = worker(tmp, "--queues", f"{Q}.lat")
        bsleep = Task(print, "bsleep", f"{Q}.lat")
        for body, count in ((0.0, 200), (0.01, 50)):
            lat = []
            for _ in range(count):
                t0 = time.perf_counter()
                bsleep.call(body)
                lat.append(time.perf_counter() - t0)
            lat.sort()
            print(f"task.call of a {body * 1000:g} ms task: median {lat[count // 2] * 1000:.2f} ms, "
                  f"p90 {lat[count * 9 // 10] * 1000:.2f} ms")
        w.terminate()
        w.wait()
    finally:
        client = pub._running()
        for q in (Q, Q + ".dead", Q + ".lat", Q + ".lat.dead", STREAM):
            try:
                client.call(names.QueueDelete(queue=q), commands.Queue.DeleteOk)
            except Exception:
                pass
        pub.close()
        r.delete(KEY)
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
