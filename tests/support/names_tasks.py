"""Tasks whose queue names RabbitMQ accepts but pamqp's grammar does not (issue 20), and a worker of many queues.

Queue names are under the test's prefix (MAGNE_TEST_PREFIX); runs are counted in Redis under MAGNE_TEST_KEY."""

import os

import redis

from magne import task

PREFIX = os.environ["MAGNE_TEST_PREFIX"]
KEY = os.environ["MAGNE_TEST_KEY"]
r = redis.Redis(host="127.0.0.1", port=6379)

QUEUES = {
    "space": f"{PREFIX} send welcome",
    "accent": f"{PREFIX}.envoyer_été",
    "cjk": f"{PREFIX}.名前を送る",
    "long": f"{PREFIX}." + "x" * 150,  # over pamqp's 127-character exchange limit
}


def _record(kind, n):
    r.hincrby(KEY, f"{kind}-{n}", 1)


for _kind, _queue in QUEUES.items():
    task(name=f"names_{_kind}", queue=_queue)(lambda n, _k=_kind: _record(_k, n))


@task(name="envoyer_été_flaky", queue=QUEUES["accent"], max_retries=1, min_backoff=0.1, max_backoff=0.1)
def flaky(n):
    """Fails its first run, so its retry goes through `<queue>.wait.<ms>` of a non-ASCII queue."""
    if r.hincrby(f"{PREFIX}:attempts", str(n), 1) == 1:
        raise RuntimeError("first attempt fails on purpose")
    _record("flaky", n)


MANY = int(os.environ.get("MAGNE_TEST_MANY_QUEUES", "0"))
for _i in range(MANY):
    task(name=f"many_{_i}", queue=f"{PREFIX}.many.{_i:04d}")(lambda n, _k=f"many{_i}": _record(_k, n))
