"""Tasks for tests/e2e/test_no_silent_drop.py (issue 20): a delayed or retried message meeting a full queue,
a dead-letter queue that refuses copies, a task that forks a helper process. Queue names come from the
environment (MAGNE_TEST_PREFIX), so tests don't collide; runs are counted in Redis."""

import os
import time

import redis

from magne import task

PREFIX = os.environ["MAGNE_TEST_PREFIX"]
KEY = os.environ["MAGNE_TEST_KEY"]
r = redis.Redis(host="127.0.0.1", port=6379)


@task(queue=f"{PREFIX}.full")
def record(n):
    """Count each run of n."""
    r.hincrby(KEY, str(n), 1)


@task(queue=f"{PREFIX}.full", max_retries=1, min_backoff=5, max_backoff=5)
def fail_once(n):
    """Fails on its first attempt (the worker publishes a retry copy, about 5 s later), succeeds on the next."""
    attempt = r.hincrby(f"{PREFIX}:attempts", str(n), 1)
    if attempt == 1:
        raise RuntimeError(f"attempt 1 of {n} fails on purpose")
    r.hincrby(KEY, str(n), 1)


@task(queue=f"{PREFIX}.deadfull", max_retries=0)
def always_fails(n):
    """Counts every run of its body, then fails: its message goes to the dead-letter queue at once."""
    r.hincrby(f"{PREFIX}:attempts", str(n), 1)
    raise ValueError(f"{n} fails on purpose")


@task(queue=f"{PREFIX}.forks")
def fork_and_block(n):
    """Forks a helper process that outlives it (sleeps 60 s; a plain fork, no exec, as multiprocessing's
    fork start method does), records the helper's pid, then blocks."""
    pid = os.fork()
    if pid == 0:
        time.sleep(60)
        os._exit(0)
    r.hset(f"{PREFIX}:helpers", str(n), pid)
    r.hincrby(f"{PREFIX}:started", str(n), 1)
    time.sleep(10**6)
