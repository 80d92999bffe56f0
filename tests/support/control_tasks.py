"""Tasks for tests/e2e/test_control.py (cancel, inspect): names come from the environment."""

import asyncio
import os
import time

import redis

from magne import task

PREFIX = os.environ["MAGNE_TEST_PREFIX"]
r = redis.Redis(host="127.0.0.1", port=6379)


@task(queue=f"{PREFIX}.main")
def note(n):
    r.hincrby(f"{PREFIX}:runs", str(n), 1)


@task(queue=f"{PREFIX}.main")
def nap(n, seconds):
    """Sleeps in short steps (an interrupt lands between them); notes its start and its end."""
    r.hincrby(f"{PREFIX}:started", str(n), 1)
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        time.sleep(0.02)
    r.hincrby(f"{PREFIX}:runs", str(n), 1)


@task(queue=f"{PREFIX}.async")
async def a_nap(n, seconds):
    r.hincrby(f"{PREFIX}:started", str(n), 1)
    await asyncio.sleep(seconds)
    r.hincrby(f"{PREFIX}:runs", str(n), 1)


@task(queue=f"{PREFIX}.main")
def boom(n):
    raise ValueError(f"boom {n}")
