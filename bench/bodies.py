"""The task bodies every peer runs, identical for all of them."""

import os
import time

KEY = os.environ.get("BENCH_COUNTER", "bench:counter")
_r = None


def _redis():
    # Imported on first use so that the raw workload (no Redis) does not pay for
    # importing redis-py at start-up, for any peer or for the bare-loop reference.
    global _r
    if _r is None:
        import redis

        _r = redis.Redis(host="127.0.0.1", port=6379)
    return _r


def incr() -> None:
    _redis().incr(KEY)


def sleep_incr(seconds: float) -> None:
    time.sleep(seconds)
    _redis().incr(KEY)


def fib_incr(n: int) -> None:
    a, b = 0, 1
    for _ in range(n):
        a, b = b, a + b
    _redis().incr(KEY)


def noop() -> None:
    pass
