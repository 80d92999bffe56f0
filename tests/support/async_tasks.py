"""Tasks for tests/e2e/test_async.py and tests/faults/test_async_faults.py: `async def` tasks beside thread tasks.

Queues and Redis keys come from the environment (the `names` fixture), like e2e_tasks. Three queues:
- `<PREFIX>.aio`: async tasks only (fed to the event loop straight from the I/O thread);
- `<PREFIX>.sync`: thread tasks only;
- `<PREFIX>.mixed`: one of each kind (the pool hands the async one over to the loop).
Tests pick the queues a worker consumes with `--queues`.

Redis keys (all under the prefix): `runs` (how many times each argument finished), `started`, `attempts`,
`cancelled` (a coroutine saw CancelledError), `cur`/`peak` (coroutines running now / at most), `t0`/`t1` (first
start and last end, for wall times).
"""

import asyncio
import os
import time

import redis

from magne import task

PREFIX = os.environ["MAGNE_TEST_PREFIX"]
KEY = os.environ["MAGNE_TEST_KEY"]
AIO = f"{PREFIX}.aio"
SYNC = f"{PREFIX}.sync"
MIXED = f"{PREFIX}.mixed"
r = redis.Redis(host="127.0.0.1", port=6379)

# Sync Redis calls from a coroutine hold the loop for a fraction of a millisecond: far below the 0.5 s the worker
# reports as a blocked loop, and one client for every task keeps the module free of loop-bound state.
_enter = r.register_script("""
local c = redis.call('incr', KEYS[1])
if c > tonumber(redis.call('get', KEYS[2]) or '0') then redis.call('set', KEYS[2], c) end
redis.call('set', KEYS[3], ARGV[1], 'NX')
return c
""")


def _started(n):
    return r.hincrby(f"{PREFIX}:started", str(n), 1)


def _done(n):
    r.hincrby(KEY, str(n), 1)


# -- async only ------------------------------------------------------------------------------------------------
@task(queue=AIO)
async def a_record(n, sleep=0.0):
    """Count each run of n, so tests can check exactly-once."""
    if sleep:
        await asyncio.sleep(sleep)
    _done(n)


async def _sleep_noting_cancel(n, seconds):
    """Started, awaits `seconds` (recording a CancelledError it sees), done."""
    _started(n)
    try:
        await asyncio.sleep(seconds)
    except asyncio.CancelledError:
        r.hincrby(f"{PREFIX}:cancelled", str(n), 1)
        raise
    _done(n)


@task(queue=AIO)
async def a_slow(n, seconds):
    """Started, awaits `seconds`, done: a warm stop lets it finish, a cold one cancels it."""
    await _sleep_noting_cancel(n, seconds)


@task(queue=AIO)
async def a_wave(n, seconds):
    """Tracks how many run at once (`cur`, `peak`) and the first start / last end (`t0`, `t1`)."""
    _enter(keys=[f"{PREFIX}:cur", f"{PREFIX}:peak", f"{PREFIX}:t0"], args=[repr(time.time())])
    try:
        await asyncio.sleep(seconds)
    finally:
        r.decr(f"{PREFIX}:cur")
    r.set(f"{PREFIX}:t1", repr(time.time()))
    _done(n)


@task(queue=AIO, max_retries=3, min_backoff=0.1, max_backoff=0.2)
async def a_flaky(n, failures=2):
    attempt = r.hincrby(f"{PREFIX}:attempts", str(n), 1)
    await asyncio.sleep(0)
    if attempt <= failures:
        raise RuntimeError(f"attempt {attempt} of {n} fails on purpose")
    _done(n)


@task(queue=AIO, max_retries=2, min_backoff=0.1, max_backoff=0.2)
async def a_always_fail(n):
    r.hincrby(f"{PREFIX}:attempts", str(n), 1)
    await asyncio.sleep(0.01)
    raise ValueError(f"{n} is broken")


@task(queue=AIO)
async def a_fail(n):
    await asyncio.sleep(0)
    raise ValueError(f"async failing on purpose for {n}")


@task(queue=AIO, time_limit=3)
async def a_limited(n, seconds=30):
    """Awaits past its time limit: the loop cancels it; it records that it saw the CancelledError."""
    await _sleep_noting_cancel(n, seconds)


@task(queue=AIO, time_limit=1, max_retries=1, min_backoff=0.1, max_backoff=0.2)
async def a_limited_retried(n):
    _started(n)
    await asyncio.sleep(30)
    _done(n)


@task(queue=AIO, time_limit=1)
async def a_swallow(n):
    """Swallows every cancel and awaits on: the loop can only abandon it."""
    _started(n)
    while True:
        try:
            await asyncio.sleep(30)
        except asyncio.CancelledError:
            r.hincrby(f"{PREFIX}:cancelled", str(n), 1)


@task(queue=AIO, time_limit=30)
async def a_block_sleep(n, seconds):
    """Holds the event loop with a blocking call (well inside its time limit)."""
    _started(n)
    time.sleep(seconds)
    _done(n)


@task(queue=AIO, time_limit=1)
async def a_busy(n):
    """Holds the event loop with a Python busy loop, past its time limit; `except Exception` must not save it."""
    _started(n)
    try:
        while True:
            pass
    except Exception:
        r.hincrby(KEY, f"swallowed-{n}", 1)


# -- thread tasks ----------------------------------------------------------------------------------------------
@task(queue=SYNC)
def s_record(n, sleep=0.0):
    if sleep:
        time.sleep(sleep)
    _done(n)


@task(queue=SYNC)
def s_block(n, seconds):
    """Holds a pool thread with a long blocking sleep."""
    _started(n)
    time.sleep(seconds)
    _done(n)


# -- one queue, both kinds ---------------------------------------------------------------------------------------
@task(queue=MIXED)
def m_sync(n, sleep=0.0):
    if sleep:
        time.sleep(sleep)
    _done(f"sync-{n}")


@task(queue=MIXED)
async def m_async(n, sleep=0.01):
    await asyncio.sleep(sleep)
    _done(f"async-{n}")


@task(queue=MIXED, time_limit=1)
async def m_async_limited(n):
    """An async task handed over by a pool thread, past its time limit: still cancelled by the loop."""
    try:
        await asyncio.sleep(30)
    except asyncio.CancelledError:
        r.hincrby(f"{PREFIX}:cancelled", str(n), 1)
        raise
    _done(f"async-{n}")


@task(queue=AIO)
async def a_raise_base(n, kind):
    """Raises a BaseException that is not an Exception (or a CancelledError of its own), as task code sometimes does."""
    _started(n)
    await asyncio.sleep(0)
    if kind == "SystemExit":
        raise SystemExit(3)
    if kind == "KeyboardInterrupt":
        raise KeyboardInterrupt
    if kind == "GeneratorExit":
        raise GeneratorExit
    if kind == "CancelledError":
        raise asyncio.CancelledError
    raise AssertionError(f"unknown kind {kind}")


@task(queue=AIO, time_limit=1)
async def a_block_in_c(n, seconds):
    """Holds the event loop inside C (time.sleep) past its time limit: no interrupt can land until it returns."""
    _started(n)
    time.sleep(seconds)
    _done(n)


@task(queue=AIO, time_limit=1, max_retries=1, min_backoff=0.1, max_backoff=0.2)
async def a_bystander(n):
    """Counts each run of its body: queued behind a coroutine that holds the loop, it must still run exactly once."""
    _done(n)


if os.environ.get("MAGNE_TEST_ASYNC_HOOKS"):
    # Lifecycle hooks around async runs (they are called on the event loop's thread); only for the hooks test, so
    # that the other tests keep the pool's path without hooks.
    from magne import hooks

    class Recorder(hooks.Hook):
        def _note(self, what):
            r.hincrby(f"{PREFIX}:hooks", what, 1)

        def before_task(self, run):
            self._note(f"before:{run.task_name}:{run.args[0]}")

        def after_run(self, task, outcome, seconds):
            self._note(f"run:{task}:{outcome}")

        def after_success(self, run):
            self._note(f"success:{run.task_name}:{run.args[0]}")

        def after_failure(self, run):
            self._note(f"failure:{run.task_name}:{run.args[0]}:{type(run.exception).__name__}")

        def on_dead_letter(self, run):
            self._note(f"dead:{run.task_name}:{run.args[0]}")

    hooks.add(Recorder())
