"""Tasks for the end-to-end tests; names come from the environment so tests don't collide."""

import os
import time

import redis

from magne import task

PREFIX = os.environ["MAGNE_TEST_PREFIX"]
KEY = os.environ["MAGNE_TEST_KEY"]
r = redis.Redis(host="127.0.0.1", port=6379)


@task(queue=f"{PREFIX}.main")
def record(n, sleep=0.0):
    """Count each run of n, so tests can check exactly-once."""
    if sleep:
        time.sleep(sleep)
    r.hincrby(KEY, str(n), 1)


@task(queue=f"{PREFIX}.main")
def fail(n, sleep=0.0):
    if sleep:
        time.sleep(sleep)
    raise ValueError(f"failing on purpose for {n}")


@task(queue=f"{PREFIX}.slow")
def slow(n, seconds):
    r.hincrby(f"{PREFIX}:started", str(n), 1)
    time.sleep(seconds)
    r.hincrby(KEY, str(n), 1)


@task(queue=f"{PREFIX}.slow", time_limit=1)
def spin(n):
    r.hincrby(f"{PREFIX}:started", str(n), 1)
    while True:
        pass


@task(queue=f"{PREFIX}.slow", time_limit=1)
def stuck(n):
    r.hincrby(f"{PREFIX}:started", str(n), 1)
    time.sleep(10**6)


@task(queue=f"{PREFIX}.slow", time_limit=1)
def stuck_then_swallow(n, seconds):
    """Stuck in C past its time limit and --lost-after (abandoned), then swallows the interrupt that lands when the
    call returns and comes back as if it succeeded."""
    r.hincrby(f"{PREFIX}:started", str(n), 1)
    try:
        time.sleep(seconds)
    except BaseException:  # noqa: B036 - on purpose
        pass
    r.hincrby(KEY, str(n), 1)


@task(queue=f"{PREFIX}.slow", time_limit=1)
def swallow(n):
    """Tries to swallow the time limit with `except Exception`: it must not manage."""
    try:
        while True:
            pass
    except Exception:
        r.hincrby(KEY, f"swallowed-{n}", 1)


if os.environ.get("MAGNE_TEST_ORIG"):
    # A task with no explicit queue: the original magne's NAME exchange/queue/key.
    task(name=os.environ["MAGNE_TEST_ORIG"])(record.fn)


@task(queue=f"{PREFIX}.slow")
def long_once(n, seconds):
    """Long only on its first run, so a redelivery after a consumer_timeout finishes."""
    first = r.hincrby(f"{PREFIX}:started", str(n), 1) == 1
    if first:
        time.sleep(seconds)
    r.hincrby(KEY, str(n), 1)


VERSION_FILE = os.environ.get("MAGNE_TEST_VERSION_FILE")
VERSION = open(VERSION_FILE).read().strip() if VERSION_FILE else "none"


@task(queue=f"{PREFIX}.main")
def record_version(n, sleep=0.0):
    """Records which code version ran n (the version is read when the module is imported)."""
    if sleep:
        time.sleep(sleep)
    r.hset(f"{PREFIX}:version", str(n), VERSION)
    r.hincrby(KEY, str(n), 1)


_CRASH_SLOT = os.environ.get("MAGNE_TEST_CRASH_SLOT")  # only this supervisor slot crashes (default: every process)
if os.environ.get("MAGNE_TEST_CRASH_AFTER") and _CRASH_SLOT in (None, os.environ.get("MAGNE_PROCESS_SLOT")):
    import threading

    def _crash():
        time.sleep(float(os.environ["MAGNE_TEST_CRASH_AFTER"]))
        os._exit(3)

    threading.Thread(target=_crash, daemon=True).start()


@task(queue=f"{PREFIX}.main", max_retries=3, min_backoff=0.1, max_backoff=0.2)
def flaky(n, failures=2):
    attempt = r.hincrby(f"{PREFIX}:attempts", str(n), 1)
    if attempt <= failures:
        raise RuntimeError(f"attempt {attempt} of {n} fails on purpose")
    r.hincrby(KEY, str(n), 1)


@task(queue=f"{PREFIX}.main", max_retries=2, min_backoff=0.1, max_backoff=0.2)
def always_fail(n):
    r.hincrby(f"{PREFIX}:attempts", str(n), 1)
    if not r.get(f"{PREFIX}:fixed"):
        raise ValueError(f"{n} is broken")
    r.hincrby(KEY, str(n), 1)


@task(queue=f"{PREFIX}.main", max_retries=5, retry_on=(KeyError,), min_backoff=0.1)
def picky(n):
    r.hincrby(f"{PREFIX}:attempts", str(n), 1)
    raise ValueError("not a KeyError: no retry")


@task(queue=f"{PREFIX}.main")
def stamp(n):
    """Records when it ran, for the delay tests."""
    r.hset(f"{PREFIX}:at", str(n), repr(time.time()))
    r.hincrby(KEY, str(n), 1)


@task(queue=f"{PREFIX}.slow", max_retries=1, min_backoff=0.1)
def fail_in_alarm(n):
    """First attempt: waits for the test's memory alarm, then fails, so its retry must be published during it."""
    attempt = r.hincrby(f"{PREFIX}:attempts", str(n), 1)
    if attempt == 1:
        while not r.get(f"{PREFIX}:alarm"):
            time.sleep(0.05)
        raise RuntimeError("failing while the broker is blocked")
    r.hincrby(KEY, str(n), 1)


@task(queue=f"{PREFIX}.slow")
def die(n):
    """A poison message: it kills the worker process every time it runs."""
    r.hincrby(f"{PREFIX}:started", str(n), 1)
    os._exit(1)


_HANG_FILE = os.environ.get("MAGNE_TEST_HANG_FILE")  # "hang" in this file: the import never finishes (a reload test)
if _HANG_FILE and os.path.exists(_HANG_FILE) and open(_HANG_FILE).read().strip() == "hang":
    time.sleep(3600)


if os.environ.get("MAGNE_TEST_RECORD_MASK"):
    import signal
    import threading

    def _record_mask():
        """A thread a task module starts at import: which signals does it (and any process it starts) block?"""
        blocked = signal.pthread_sigmask(signal.SIG_BLOCK, [])
        r.hset(f"{PREFIX}:mask", os.environ.get("MAGNE_PROCESS_SLOT", "-"), ",".join(sorted(s.name for s in blocked)))

    threading.Thread(target=_record_mask, daemon=True).start()
