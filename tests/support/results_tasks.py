"""Tasks for the results and workflow end-to-end tests; queue names come from the environment."""

import os
import time

from magne import task

PREFIX = os.environ["MAGNE_TEST_PREFIX"]


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
    return sum(values) + extra


@task(queue=f"{PREFIX}.main")
def square(x, sleep=0.0):
    if sleep:
        time.sleep(sleep)
    return x * x
