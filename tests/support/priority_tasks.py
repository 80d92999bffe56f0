"""A task on a queue with priorities, recording the order in which its messages ran."""

import os

import redis

from magne import task

PREFIX = os.environ["MAGNE_TEST_PREFIX"]
r = redis.Redis(host="127.0.0.1", port=6379)


@task(queue=f"{PREFIX}.prio", max_priority=10, priority=1)
def ordered(label):
    r.rpush(f"{PREFIX}:order", label)
