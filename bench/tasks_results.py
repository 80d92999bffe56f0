"""The results workload's round-trip task (bench/call_latency.py): it sleeps for what it is given and returns it."""

import time

from magne import task

Q = "bench-magne-call"


@task(name="sleep_return", queue=Q)
def sleep_return(seconds: float) -> float:
    if seconds:
        time.sleep(seconds)
    return seconds
