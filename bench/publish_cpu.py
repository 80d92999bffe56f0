"""Where a publish's CPU goes, by thread: python -m bench.publish_cpu N {many,loop}.

Sends N `incr` messages into the publish workload's queue (bench-magne) with `send_many` or a one-thread
`send()` loop, after one warm-up send (so the connection and declarations are outside the figure), and
prints the rate, the wall time per message and each thread's CPU microseconds per message (from /proc, so
the sending thread and the magne-publisher loop thread are told apart without a profiler in the way).
A publish ceiling is the broker's when the CPU per message is far below the wall time per message.
Purges the queue after. Linux only.
"""

from __future__ import annotations

import os
import sys
import threading
import time

import pika

import magne
from bench import peers, tasks_magne

URL = "amqp://guest:guest@127.0.0.1:5672/%2F"


def thread_cpu() -> dict[str, float]:
    """CPU seconds of each thread of this process, by thread name."""
    tick = os.sysconf("SC_CLK_TCK")
    names = {t.native_id: t.name for t in threading.enumerate()}
    out = {}
    for tid in os.listdir("/proc/self/task"):
        with open(f"/proc/self/task/{tid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        out[names.get(int(tid), tid)] = (int(fields[11]) + int(fields[12])) / tick
    return out


def main() -> None:
    n, mode = int(sys.argv[1]), sys.argv[2]
    peers._magne_declare()
    magne.configure(URL)
    incr = tasks_magne.incr
    incr.send()
    c0, t0 = thread_cpu(), time.perf_counter()
    if mode == "many":
        incr.send_many(() for _ in range(n)).raise_on_failure()
    else:
        for _ in range(n):
            incr.send()
    dt = time.perf_counter() - t0
    c1 = thread_cpu()
    split = {k: round((c1[k] - c0.get(k, 0.0)) / n * 1e6, 1) for k in c1 if c1[k] > c0.get(k, 0.0)}
    print(f"{mode} {n}: {n / dt:,.0f}/s, wall {dt / n * 1e6:.1f} us/msg, CPU us/msg by thread: {split}")
    magne.publisher.default_publisher().close()
    conn = pika.BlockingConnection(pika.URLParameters(URL))
    conn.channel().queue_purge("bench-magne")
    conn.close()


if __name__ == "__main__":
    main()
