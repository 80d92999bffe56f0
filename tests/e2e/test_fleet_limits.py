"""Fleet-wide concurrency caps and rate limits on the real broker, across worker processes (docs/schedules.md)."""

from __future__ import annotations

import signal
import time

import pytest

from support import task_body, wait_for


@pytest.fixture
def lim(broker, redis, names):
    p = names["MAGNE_TEST_PREFIX"]
    q = {k: f"{p}.{k}" for k in ("capped", "held", "rated")}
    broker.track(*q.values())
    broker.track_prefix(p)
    yield q
    keys = list(redis.scan_iter(match=f"{p}:*"))
    if keys:
        redis.delete(*keys)


def _max_overlap(spans):
    events = sorted([(s, 1) for s, _e in spans] + [(e, -1) for _s, e in spans])
    cur = top = 0
    for _t, step in events:
        cur += step
        top = max(top, cur)
    return top


def test_concurrency_cap_holds_across_processes_and_kill_9_frees_the_slots(broker, redis, names, lim, start_worker):
    p = names["MAGNE_TEST_PREFIX"]
    a = start_worker("--threads", "8", modules=("limit_tasks",))
    a.wait_ready()
    # A alone takes both slots of `hold`, then B starts; A is killed -9 while holding them.
    for i in range(2):
        broker.publish(lim["held"], lim["held"], task_body("hold", i))
    wait_for(lambda: redis.llen(f"{p}:held") == 2, 15, what="both slots taken by A")
    b = start_worker("--threads", "8", modules=("limit_tasks",))
    b.wait_ready()
    a.proc.send_signal(signal.SIGKILL)
    a.proc.wait(5)
    killed = time.time()
    wait_for(lambda: redis.llen(f"{p}:held") == 4, 15, what="B to get both slots back after A's kill -9")
    rerun = [float(x.split()[2]) for x in map(bytes.decode, redis.lrange(f"{p}:held", 2, 3))]
    assert all(str(b.pid) in x.decode() for x in redis.lrange(f"{p}:held", 2, 3))
    redis.set(f"{p}:release", 1)
    c = start_worker("--threads", "8", modules=("limit_tasks",))
    c.wait_ready()
    n, seconds = 30, 0.1
    t0 = time.time()
    for i in range(n):
        broker.publish(lim["capped"], lim["capped"], task_body("capped", i, seconds))
    wait_for(lambda: redis.llen(f"{p}:spans") == n, 30, what="every capped run")
    elapsed = time.time() - t0
    spans = [tuple(map(float, x.split()[:2])) for x in redis.lrange(f"{p}:spans", 0, -1)]
    pids = {x.split()[2] for x in redis.lrange(f"{p}:spans", 0, -1)}
    runs = {k.decode(): int(v) for k, v in redis.hgetall(f"{p}:runs").items()}
    assert runs == {str(i): 1 for i in range(n)}
    assert _max_overlap(spans) == 2
    assert len(pids) == 2, "both processes ran some"
    wait_for(lambda: broker.ready(lim["capped"]) == 0, 5, what="capped queue empty")
    assert broker.ready(lim["capped"] + ".dead") == 0
    for w in (b, c):
        assert w.stop() == 0
    overhead = (elapsed - n * seconds / 2) / n
    print(f"slot back after kill -9: {max(rerun) - killed:.2f}s; {n} runs of {seconds}s under a cap of 2 in "
          f"{elapsed:.2f}s (ideal {n * seconds / 2:.2f}s): {overhead * 1000:.1f} ms overhead per run")


def test_rate_limit_holds_across_processes_and_nothing_is_retried_or_dead_lettered(broker, redis, names, lim,
                                                                                   start_worker):
    p = names["MAGNE_TEST_PREFIX"]
    workers = [start_worker("--threads", "8", modules=("limit_tasks",)) for _ in range(2)]
    for w in workers:
        w.wait_ready()
    n = 35
    for i in range(n):
        broker.publish(lim["rated"], lim["rated"], task_body("rated", i))
    wait_for(lambda: redis.llen(f"{p}:starts") == n, 30, what="every rated run")
    starts = sorted(float(x) for x in redis.lrange(f"{p}:starts", 0, -1))
    worst = max(sum(1 for t in starts if s <= t < s + 1.0) for s in starts)
    runs = {k.decode(): int(v) for k, v in redis.hgetall(f"{p}:runs").items()}
    assert runs == {str(i): 1 for i in range(n)}
    assert broker.ready(lim["rated"] + ".dead") == 0
    for w in workers:
        assert w.stop() == 0
        assert w.counters().get("retried", 0) == 0
    span = starts[-1] - starts[0]
    print(f"rate 10/s: {n} starts over {span:.2f}s (ideal {(n - 10) / 10:.1f}s after the first burst of 10); "
          f"most starts in any 1 s window: {worst}")
    assert worst <= 11  # 10 by the tokens; 1 for the time between a token's handover and the task's own clock
    assert span >= (n - 10) / 10 - 0.2
