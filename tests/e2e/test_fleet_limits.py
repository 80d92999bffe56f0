"""Fleet-wide concurrency caps and rate limits on the real broker, across worker processes (docs/schedules.md)."""

from __future__ import annotations

import signal
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
from pamqp import commands

from magne.amqp.url import parse_urls
from magne.engine.client import Client
from magne.gate import TOKEN, Gate, Limit
from magne.gate import Pool as TokenPool
from support import URL, task_body, wait_for


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
        assert w.counters()["retried"] == 0 and w.counters()["dead"] == 0 and w.counters()["acked"] > 0
    span = starts[-1] - starts[0]
    least = (n - 1) // 10  # start k+10 comes at least 1 s after start k: 35 starts need at least 3 s
    print(f"rate 10/s: {n} starts over {span:.2f}s (the limit allows no less than {least:.1f}s); "
          f"most starts in any 1 s window: {worst}")
    assert worst <= 11  # 10 by the tokens; 1 for the time between a token's handover and the task's own clock
    assert span >= least - 0.1


def test_a_token_pool_is_filled_exactly_once_by_racing_fillers_and_after_a_filler_died(broker, names, lim):
    base = f"{names['MAGNE_TEST_PREFIX']}.pool"
    clients = [Client(parse_urls(URL)[0], "magne test") for _ in range(4)]
    try:
        # A filler that died half-way: 2 of the 5 tokens published, no marker.
        pool = TokenPool(base, "cap", 5)
        for method in pool.declarations():
            clients[0].call(method, commands.Queue.DeclareOk)
        for _ in range(2):
            clients[0].publish_confirmed("", pool.tokens, b"", TOKEN)
        gates = [Gate(lambda c=c: c, {base: Limit(5)}, {base: lambda d: None}, lambda d: None) for c in clients]
        with ThreadPoolExecutor(4) as ex:  # four workers starting at once
            list(ex.map(lambda g: wait_for(lambda: g._filled(g.client(), pool), 10, 0.01, "filled"), gates))
        wait_for(lambda: broker.ready(pool.tokens) == 5, 5, what="exactly 5 tokens")
        time.sleep(0.2)
        assert broker.ready(pool.tokens) == 5
        # Leases out while another worker starts: the marker is there, nothing is added.
        leases = [clients[1].lease(pool.tokens) for _ in range(3)]
        assert all(leases) and gates[2]._filled(clients[2], pool)
        for lease in leases:
            clients[1].release(*lease)
        wait_for(lambda: broker.ready(pool.tokens) == 5, 5, what="the 3 leases back")
        assert broker.ready(pool.tokens) == 5
    finally:
        for c in clients:
            c.close()
