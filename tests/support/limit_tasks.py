"""Tasks for the fleet-wide limit e2e tests (names from the environment, so tests don't collide)."""

import os
import time

import redis

from magne import task

PREFIX = os.environ["MAGNE_TEST_PREFIX"]
r = redis.Redis(host="127.0.0.1", port=6379)


@task(queue=f"{PREFIX}.capped", concurrency=2)
def capped(i, seconds=0.0):
    start = time.time()
    r.hincrby(f"{PREFIX}:runs", str(i), 1)
    time.sleep(seconds)
    r.rpush(f"{PREFIX}:spans", f"{start} {time.time()} {os.getpid()}")


@task(queue=f"{PREFIX}.held", concurrency=2)
def hold(i):
    """Hold a slot until the test says so (or 20 s)."""
    r.rpush(f"{PREFIX}:held", f"{i} {os.getpid()} {time.time()}")
    deadline = time.time() + 20
    while time.time() < deadline and not r.exists(f"{PREFIX}:release"):
        time.sleep(0.02)


@task(queue=f"{PREFIX}.rated", rate="10/s")
def rated(i):
    r.rpush(f"{PREFIX}:starts", f"{time.time()}")
    r.hincrby(f"{PREFIX}:runs", str(i), 1)
