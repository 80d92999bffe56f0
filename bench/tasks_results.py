"""The results workload's tasks, on queues of their own (bench/peers.py: results-off, results-on; bench/call_latency.py):
the throughput workload's body, and a task that sleeps for what it is given and returns it (task.call's round trip)."""

import time

from bench import bodies
from magne import task

Q, CALL_Q = "bench-magne-results", "bench-magne-call"
STREAM = "bench-magne-results.stream"  # the results stream of the workload

incr = task(name="incr", queue=Q)(bodies.incr)


@task(name="sleep_return", queue=CALL_Q)
def sleep_return(seconds: float) -> float:
    if seconds:
        time.sleep(seconds)
    return seconds
