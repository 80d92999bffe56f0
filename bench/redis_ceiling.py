"""The ceiling reference for the throughput workload: no broker, no worker.

8 threads in one process run the throughput task body (one redis-py INCR) N times
in a loop. No single-process, 8-thread Python worker can run that body faster on
this machine, whatever its broker side costs. Prints the rate as JSON.
Run: python -m bench.redis_ceiling N
"""

from __future__ import annotations

import json
import sys
import threading
import time

from bench import bodies


def main(n: int, threads: int = 8) -> None:
    bodies.incr()  # connect before the clock starts, as a worker would have
    per = n // threads
    ts = [threading.Thread(target=lambda: [bodies.incr() for _ in range(per)]) for _ in range(threads)]
    t0 = time.perf_counter()
    c0 = time.process_time()
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    elapsed = time.perf_counter() - t0
    print(json.dumps({"n": per * threads, "elapsed": elapsed, "cpu_s": time.process_time() - c0}))


if __name__ == "__main__":
    main(int(sys.argv[1]))
