"""magne tasks standing in for dramatiq actors and celery tasks (tests/e2e/test_migration.py).

Queue names come from the environment: MAGNE_TEST_PREFIX + ".dram" is a dramatiq queue, + ".cel" a celery one.
Each task records its runs in Redis: KEY (runs per argument), PREFIX:at (when it ran), PREFIX:attempts.
"""

import os
import time

import redis

from magne import task

PREFIX = os.environ["MAGNE_TEST_PREFIX"]
KEY = os.environ["MAGNE_TEST_KEY"]
DRAM = f"{PREFIX}.dram"
CEL = f"{PREFIX}.cel"
r = redis.Redis(host="127.0.0.1", port=6379)


def _record(n, sleep=0.0):
    if sleep:
        time.sleep(sleep)
    r.hincrby(KEY, str(n), 1)
    r.hset(f"{PREFIX}:at", str(n), repr(time.time()))


@task(name="mig.record", queue=DRAM)
def record(n, sleep=0.0):
    _record(n, sleep)


@task(name="mig.flaky", queue=DRAM, max_retries=3, min_backoff=0.1, max_backoff=0.1)
def flaky(n):
    r.hincrby(f"{PREFIX}:attempts", str(n), 1)
    raise ValueError(f"flaky {n} fails")


@task(name="mig.crecord", queue=CEL)
def crecord(n, sleep=0.0):
    _record(n, sleep)


@task(name="mig.cflaky", queue=CEL, max_retries=2, min_backoff=0.1, max_backoff=0.1)
def cflaky(n):
    r.hincrby(f"{PREFIX}:attempts", str(n), 1)
    raise ValueError(f"cflaky {n} fails")


@task(name="mig.cslow", queue=CEL)
def cslow(n):
    r.hincrby(f"{PREFIX}:started", str(n), 1)
    for _ in range(200):  # short sleeps: the time-limit interrupt lands between them
        time.sleep(0.05)
    _record(n)
