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
