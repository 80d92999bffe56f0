"""Time limits that free the thread (design: what hurts users, dramatiq #445)."""

from __future__ import annotations

import random
import threading
import time
from queue import SimpleQueue

from magne import wire
from magne.delivery import Delivery, Outcome
from magne.pool import Pool
from magne.registry import Task
from support import queue_counts, runs, task_body, wait_for


def dead_letters(broker, queue: str, n: int) -> dict[str, dict]:
    wait_for(lambda: broker.ready(queue + ".dead") >= n, 30, what=f"{n} dead letters")
    return {orjson_args(b): p.headers for p, b in broker.get_all(queue + ".dead")}


def orjson_args(b: bytes) -> str:
    import orjson

    return str(orjson.loads(b)["args"][0])


def test_busy_loop_is_interrupted_and_except_exception_does_not_swallow_it(broker, redis, names, start_worker):
    q = names["slow"]
    w = start_worker("--threads", "2")
    w.wait_ready()
    t0 = time.monotonic()
    broker.publish(q, q, task_body("spin", 1))
    broker.publish(q, q, task_body("swallow", 2))
    dl = dead_letters(broker, q, 2)
    assert time.monotonic() - t0 < 10
    assert dl["1"]["x-magne-reason"] == "time limit" and dl["2"]["x-magne-reason"] == "time limit"
    assert dl["1"]["x-magne-error-type"] == "TimeLimitExceeded"
    assert runs(redis, names).get("swallowed-2") is None, "except Exception must not catch the time limit"
    # The interrupted threads are free again: the pool runs new work on both.
    for i in range(20):
        broker.publish(q, q, task_body("slow", i, 0))
    wait_for(lambda: len(runs(redis, names)) == 20, 20, what="work after the interrupts")
    assert queue_counts(q) == (0, 0)
    assert "abandon" not in w.log()


def test_thread_stuck_in_sleep_is_abandoned_and_replaced(broker, redis, names, start_worker):
    q = names["slow"]
    w = start_worker("--threads", "2", "--prefetch", "4", "--lost-after", "1")
    w.wait_ready()
    broker.publish(q, q, task_body("stuck", 1))
    wait_for(lambda: "abandoning it" in w.log(), 20, what="the stuck thread to be abandoned")
    dl = dead_letters(broker, q, 1)
    assert dl["1"]["x-magne-reason"] == "time limit"
    assert "abandoned" in dl["1"]["x-magne-error-message"]
    # Throughput goes on with the replacement thread: both threads' worth of work.
    t0 = time.monotonic()
    for i in range(40):
        broker.publish(q, q, task_body("slow", i, 0.1))
    wait_for(lambda: len(runs(redis, names)) == 40, 30, what="work after the abandon")
    # 40 x 0.1 s on 2 threads is 2 s; on one thread it would be 4 s.
    assert time.monotonic() - t0 < 3.8
    assert queue_counts(q) == (0, 0)
    w.signal(__import__("signal").SIGUSR1)
    wait_for(lambda: w.events("status"), 10, what="a status record")
    counters = w.events("status")[-1]["counters"]
    assert counters["threads_lost"] == 1 and counters["threads_live"] == 2


def test_late_interrupts_kill_nothing_and_lose_nothing(caplog):
    """Tasks finishing right at their limit, under a watchdog polling flat out: every
    delivery comes back exactly once, as done or as time limit, and no thread dies."""
    work: SimpleQueue[Delivery | None] = SimpleQueue()
    got: list[Delivery] = []
    lock = threading.Lock()

    def report(d: Delivery) -> None:
        with lock:
            got.append(d)

    def edge(delay):
        end = time.perf_counter() + delay
        while time.perf_counter() < end:
            pass

    tasks = {"edge": Task(edge, "edge", "Q", 0.005)}
    pool = Pool(4, tasks, work, report, lost_after=5)
    pool.start()
    rng = random.Random(7)
    n = 1500
    for tag in range(1, n + 1):
        work.put(Delivery(tag, 1, "Q", wire.encode("edge", [rng.uniform(0.003, 0.007)]), b"", False))
    stop = threading.Event()

    def watchdog():
        while not stop.is_set():
            pool.check(time.monotonic())

    wd = threading.Thread(target=watchdog)
    wd.start()
    try:
        wait_for(lambda: len(got) == n, 60, interval=0.01, what="every delivery back")
    finally:
        stop.set()
        wd.join()
    tags = [d.tag for d in got]
    assert sorted(tags) == list(range(1, n + 1)), "each delivery exactly once"
    outcomes = {d.outcome for d in got}
    assert outcomes <= {Outcome.ACK, Outcome.DEAD}
    assert {d.reason for d in got if d.outcome is Outcome.DEAD} <= {"time limit"}
    assert any(d.outcome is Outcome.DEAD for d in got) and any(d.outcome is Outcome.ACK for d in got)
    assert pool.alive() == 4 and pool.lost == 0
    # The slot protocol never lets an interrupt out into the pool's own code.
    assert "stray interrupt" not in caplog.text
    pool.stop()
    pool.join(5)


def test_time_limit_is_retried_like_any_failure(broker, redis, names, start_worker):
    q = names["slow"]
    w = start_worker("--threads", "2", "--max-retries", "1", "--min-backoff", "0.1", "--max-backoff", "0.2")
    w.wait_ready()
    broker.publish(q, q, task_body("spin", "r"))
    wait_for(lambda: broker.ready(q + ".dead") == 1, 30, what="the dead letter after one retry")
    (props, _), = broker.get_all(q + ".dead")
    assert props.headers["x-magne-retries"] == 1
    assert [e["reason"] for e in props.headers["x-magne-history"]] == ["time limit", "time limit"]
    started = redis.hget(f"{names['MAGNE_TEST_PREFIX']}:started", "r")
    assert started == b"2"


def test_abandoned_thread_coming_back_is_not_counted_a_success(broker, redis, names, start_worker):
    """Its message was dead-lettered when the thread was abandoned: when the call returns and the body ends as if it
    succeeded, neither the hooks (--metrics counts by them) nor anything else may call that run a success."""
    from support.scrape import Scrape, metrics_url

    q = names["slow"]
    w = start_worker("--threads", "2", "--lost-after", "1", "--metrics", "127.0.0.1:0")
    w.wait_ready()
    url = metrics_url(w)
    broker.publish(q, q, task_body("stuck_then_swallow", "s", 4))
    wait_for(lambda: "abandoning it" in w.log(), 20, what="the stuck thread to be abandoned")
    dl = dead_letters(broker, q, 1)
    assert dl["s"]["x-magne-reason"] == "time limit"
    wait_for(lambda: runs(redis, names).get("s") == 1, 10, what="the abandoned call to return")
    wait_for(lambda: "came back" in w.log(), 10, what="the late return to be logged")
    s = Scrape(url)
    assert s.get("magne_task_duration_seconds_count", task="stuck_then_swallow", outcome="success") == 0
    assert s.get("magne_task_duration_seconds_count", task="stuck_then_swallow", outcome="dead") == 0, \
        "the abandoned run's own timing is not a run's outcome either: the main thread decided it"
    assert w.stop() == 0
    assert w.counters()["dead"] == 1 and w.counters()["acked"] == 0
