"""Tasks for the nested workflow end-to-end tests (tests/e2e/test_results_nesting.py); queue names come from the
environment. Tasks that count their runs do so in Redis, so a test can tell a step ran once."""

import os
import time

import redis

from magne import task

PREFIX = os.environ["MAGNE_TEST_PREFIX"]
KEY = os.environ["MAGNE_TEST_KEY"]
r = redis.Redis(host="127.0.0.1", port=6379)


@task(queue=f"{PREFIX}.main")
def add(a, b):
    return a + b


@task(queue=f"{PREFIX}.main")
def inc(x):
    return x + 1


@task(queue=f"{PREFIX}.main")
async def dbl(x):
    return x * 2


@task(queue=f"{PREFIX}.main")
def boom(*args):
    raise ValueError(f"failing on purpose with {list(args)}")


@task(queue=f"{PREFIX}.main")
def total(values, extra=0):
    r.hincrby(KEY, "total", 1)  # the test counts the runs of the step after a group
    return sum(values) + extra


@task(queue=f"{PREFIX}.main")
def square(x, sleep=0.0):
    r.hincrby(KEY, "square", 1)
    if sleep:
        time.sleep(sleep)
    return x * x


@task(queue=f"{PREFIX}.main")
def piece(i, sleep, base):
    r.hincrby(KEY, "piece", 1)
    time.sleep(sleep)
    return i * i + base
