"""The task bodies every peer runs, identical for all of them."""

import asyncio
import os
import time
from typing import Any

KEY = os.environ.get("BENCH_COUNTER", "bench:counter")
_r = None
_ar: Any = None  # redis.asyncio.Redis, made on first use inside the worker's event loop


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


def _aredis() -> Any:
    # The async body's client: redis.asyncio, so the INCR does not block the event loop. A pool of
    # 8 connections (what the 8 threads of the sync latency workload hold): the 1,000 INCRs come in
    # bursts of hundreds when sleeps of the same length end together, and an unbounded pool would open
    # hundreds of Redis connections at once, a cost of the body rather than of the worker under test.
    global _ar
    if _ar is None:
        import redis.asyncio

        _ar = redis.asyncio.Redis(connection_pool=redis.asyncio.BlockingConnectionPool(
            host="127.0.0.1", port=6379, max_connections=8, timeout=None))
    return _ar


async def async_sleep_incr(seconds: float) -> None:
    """The async-latency body: the latency workload's sleep, awaited, then the INCR without blocking."""
    await asyncio.sleep(seconds)
    await _aredis().incr(KEY)
