"""Tasks for the results and workflow end-to-end tests; queue names come from the environment."""

import os
import time

import redis

from magne import task

PREFIX = os.environ["MAGNE_TEST_PREFIX"]
KEY = os.environ["MAGNE_TEST_KEY"]
r = redis.Redis(host="127.0.0.1", port=6379)


@task(queue=f"{PREFIX}.main", results=True)
def add(a, b):
    return a + b


@task(queue=f"{PREFIX}.main")
def mul(a, b):
    return a * b


@task(queue=f"{PREFIX}.main")
def boom(*args):
    raise ValueError(f"failing on purpose with {list(args)}")


@task(queue=f"{PREFIX}.main")
async def aadd(a, b):
    return a + b


@task(queue=f"{PREFIX}.main")
def nap(seconds):
    time.sleep(seconds)
    return seconds


@task(queue=f"{PREFIX}.main")
def total(values, extra=0):
    r.hincrby(KEY, "total", 1)  # the test counts the callback's runs
    return sum(values) + extra


@task(queue=f"{PREFIX}.main")
def square(x, sleep=0.0):
    r.hincrby(KEY, "square", 1)
    if sleep:
        time.sleep(sleep)
    return x * x


@task(queue=f"{PREFIX}.later")
def later_total(values, extra=0):
    """A chord's callback on a queue of its own: a test counts the callbacks waiting in it before any runs."""
    r.hincrby(KEY, "total", 1)
    return sum(values) + extra
