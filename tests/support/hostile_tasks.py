"""Tasks for tests/e2e/test_hostile.py: task code and messages that try to break the worker.

Names start with `h_` so this module can be loaded next to e2e_tasks. Queues and Redis
keys come from the environment (the `names` fixture), like e2e_tasks.
"""

import logging
import os
import sys
import time

import redis

from magne import task

PREFIX = os.environ["MAGNE_TEST_PREFIX"]
KEY = os.environ["MAGNE_TEST_KEY"]
MAIN = f"{PREFIX}.main"
QUEUE_A = f"{PREFIX}.qa"
QUEUE_B = f"{PREFIX}.qb"
r = redis.Redis(host="127.0.0.1", port=6379)
hostile_log = logging.getLogger("hostile")


@task(queue=MAIN)
def h_record(n):
    r.hincrby(KEY, str(n), 1)


@task(queue=MAIN)
def h_fail(n, message_size=0):
    """Always raises; `message_size` pads the error message (to make big dead letters)."""
    r.hincrby(f"{PREFIX}:attempts", str(n), 1)
    raise ValueError(f"h_fail {n} fails on purpose " + "e" * message_size)


@task(queue=MAIN, max_retries=2, min_backoff=0.1, max_backoff=0.2)
def h_fail_retried(n):
    """Always raises, with two retries: exactly three runs when it starts from zero retries."""
    r.hincrby(f"{PREFIX}:attempts", str(n), 1)
    raise ValueError(f"h_fail_retried {n} fails on purpose")


@task(queue=MAIN)
def h_repr(*args):
    """Records repr() of each argument, to see exactly what the task received."""
    for a in args:
        r.hincrby(KEY, repr(a), 1)


@task(queue=MAIN)
def h_raise_base(n, kind):
    """Raises a BaseException that is not an Exception, as task code sometimes does."""
    r.hincrby(f"{PREFIX}:started", str(n), 1)
    if kind == "sys.exit":
        sys.exit()
    if kind == "SystemExit(3)":
        raise SystemExit(3)
    if kind == "KeyboardInterrupt":
        raise KeyboardInterrupt
    if kind == "GeneratorExit":
        raise GeneratorExit
    raise AssertionError(f"unknown kind {kind}")


@task(queue=MAIN, time_limit=0.05)
def h_log_spin(n):
    """Logs in a tight loop through the worker's own logging handler until the time limit interrupts it."""
    while True:
        hostile_log.info("spin %s", n)


@task(queue=QUEUE_A)
def h_a(n):
    r.hincrby(KEY, str(n), 1)


@task(queue=QUEUE_B)
def h_b(n, seconds):
    r.hincrby(f"{PREFIX}:started", str(n), 1)
    time.sleep(seconds)
    r.hincrby(KEY, str(n), 1)
