"""Tasks for the cluster tests: one quorum queue and one classic queue, each run recorded in Redis."""

import os

import redis

from magne import task

PREFIX = os.environ["MAGNE_TEST_PREFIX"]
KEY = os.environ["MAGNE_TEST_KEY"]
r = redis.Redis(host="127.0.0.1", port=6379)


@task(queue=f"{PREFIX}.q", queue_type="quorum")
def on_quorum(n, sleep=0.0):
    if sleep:
        import time

        time.sleep(sleep)
    r.hincrby(KEY, f"q{n}", 1)


@task(queue=f"{PREFIX}.c", queue_type="classic")
def on_classic(n):
    r.hincrby(KEY, f"c{n}", 1)


@task(queue=f"{PREFIX}.q", queue_type="quorum", results=True)
def recorded(n, sleep=0.0):
    """Records its result (the results stream's durability through a node loss)."""
    if sleep:
        import time

        time.sleep(sleep)
    r.hincrby(KEY, f"r{n}", 1)
    return n * 10


@task(queue=f"{PREFIX}.q", queue_type="quorum")
def member(n, sleep=0.0):
    """A chord's member."""
    if sleep:
        import time

        time.sleep(sleep)
    r.hincrby(KEY, f"m{n}", 1)
    return n * n


@task(queue=f"{PREFIX}.q", queue_type="quorum")
def callback(values, extra=0):
    """A chord's callback: the test counts its runs."""
    r.hincrby(KEY, "callback", 1)
    return sum(values) + extra
