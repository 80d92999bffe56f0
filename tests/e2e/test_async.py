"""`async def` tasks end to end, on the real broker: the cases thread tasks pass, passed by coroutines on the
worker's event loop (magne/asyncpool.py). Tasks are in tests/support/async_tasks.py."""

from __future__ import annotations

import signal
import time

import orjson
import pytest

from support import URL, channels_of, connections_named, connections_of, queue_counts, runs, task_body, wait_for


@pytest.fixture
def start_async(start_worker, aq):
    """A worker of async_tasks consuming the given queues (names from `aq`), ready."""

    def start(*queues: str, args: tuple[str, ...] = (), url: str = URL, ready: bool = True):
        w = start_worker(*args, "--queues", *[aq[k] for k in queues], modules=("async_tasks",), url=url)
        if ready:
            w.wait_ready()
        return w

    return start


def publish(broker, queue: str, func: str, *args) -> None:
    broker.publish(queue, queue, task_body(func, *args))


def hash_of(redis, key: str) -> dict[str, int]:
    return {k.decode(): int(v) for k, v in redis.hgetall(key).items()}


def started(redis, aq) -> dict[str, int]:
    return hash_of(redis, f"{aq['prefix']}:started")


def cancelled(redis, aq) -> dict[str, int]:
    return hash_of(redis, f"{aq['prefix']}:cancelled")


def attempts(redis, aq) -> dict[str, int]:
    return hash_of(redis, f"{aq['prefix']}:attempts")


def dead_letters(broker, queue: str, n: int, timeout: float = 30) -> dict[str, object]:
    """The first `n` dead letters of `queue`, by their first argument: (properties, body)."""
    wait_for(lambda: broker.ready(queue + ".dead") >= n, timeout, what=f"{n} dead letters in {queue}.dead")
    return {str(orjson.loads(b)["args"][0]): (p, b) for p, b in broker.get_all(queue + ".dead")}


# -- 1. exactly once, one connection -------------------------------------------------------------------------------
def test_async_tasks_run_exactly_once_on_one_connection(broker, redis, names, aq, start_async):
    n = 300
    w = start_async("aio")
    for i in range(n):
        publish(broker, aq["aio"], "a_record", i, 0.01)
    wait_for(lambda: len(runs(redis, names)) == n, 30, what=f"{n} async tasks to run")
    assert len(connections_of(w.pid)) == 1
    assert channels_of(w.pid) == 1
    wait_for(lambda: queue_counts(aq["aio"]) == (0, 0), 10, interval=0.2, what="queue empty with nothing unacked")
    assert w.stop() == 0
    assert set(runs(redis, names).values()) == {1}
    counters = w.counters()
    assert counters["acked"] == n
    assert counters["redelivered"] == 0


def test_async_messages_waiting_before_the_worker_starts_all_run(broker, redis, names, aq, start_async):
    """The usual restart: the queue already holds messages when the worker connects and consumes."""
    n = 100
    q = aq["aio"]
    first = start_async("aio")  # declares the queue
    assert first.stop() == 0
    for i in range(n):
        publish(broker, q, "a_record", i)
    w = start_async("aio", ready=False)
    wait_for(lambda: len(runs(redis, names)) == n, 15, what=f"the {n} messages that were waiting")
    assert set(runs(redis, names).values()) == {1}
    assert not w.events("connection_lost"), [e["message"] for e in w.events("connection_lost")]
    wait_for(lambda: queue_counts(q) == (0, 0), 10, interval=0.2, what="queue empty")
    assert w.stop() == 0
    assert w.counters()["acked"] == n


# -- 2. neither kind starves the other -----------------------------------------------------------------------------
def test_async_tasks_are_not_starved_by_blocked_threads(broker, redis, names, aq, start_async):
    w = start_async("sync", "aio", args=("--threads", "2", "--prefetch", "4"))
    for i in range(2):  # both threads held for 4 s
        publish(broker, aq["sync"], "s_block", f"block-{i}", 4)
    wait_for(lambda: len(started(redis, aq)) == 2, 10, what="both threads blocked")
    t0 = time.monotonic()
    for i in range(50):
        publish(broker, aq["aio"], "a_record", i, 0.05)
    wait_for(lambda: sum(1 for k in runs(redis, names) if not k.startswith("block")) == 50, 10,
             what="the async tasks while every thread is blocked")
    assert time.monotonic() - t0 < 3, "async tasks must not wait for a free thread"
    assert not any(k.startswith("block") for k in runs(redis, names)), "the threads are still blocked"
    assert w.proc.poll() is None


def test_thread_tasks_are_not_delayed_by_a_loop_full_of_slow_coroutines(broker, redis, names, aq, start_async):
    w = start_async("sync", "aio", args=("--threads", "2", "--async-concurrency", "5"))
    for i in range(10):  # 5 running for 4 s, 5 (one of them prefetched) waiting for a place on the loop
        publish(broker, aq["aio"], "a_slow", f"slow-{i}", 4)
    wait_for(lambda: len(started(redis, aq)) == 5, 10, what="the loop full of slow coroutines")
    t0 = time.monotonic()
    for i in range(20):
        publish(broker, aq["sync"], "s_record", i, 0.01)
    wait_for(lambda: sum(1 for k in runs(redis, names) if not k.startswith("slow")) == 20, 10,
             what="the thread tasks while the loop is full")
    assert time.monotonic() - t0 < 5
    assert not any(k.startswith("slow") for k in runs(redis, names)), "the coroutines are still sleeping"
    assert len(started(redis, aq)) == 5, "never more coroutines than --async-concurrency"
    w.signal(signal.SIGUSR1)
    status = wait_for(lambda: w.events("status"), 10, what="a status record")[-1]["counters"]
    assert status["async_running"] == 5 and status["async_waiting"] == 1  # prefetch 6: 5 running, 1 waiting
    assert status["async_loop_stalls"] == 0 and status["async_abandoned"] == 0
    assert w.proc.poll() is None


# -- 3. concurrency ---------------------------------------------------------------------------------------------------
def test_async_concurrency_bounds_the_coroutines_and_sets_the_pace(broker, redis, names, aq, start_async):
    n, c, seconds = 200, 50, 0.5
    w = start_async("aio", args=("--async-concurrency", str(c)))
    for i in range(n):
        publish(broker, aq["aio"], "a_wave", i, seconds)
    wait_for(lambda: len(runs(redis, names)) == n, 20, what=f"{n} sleeping coroutines")
    p = aq["prefix"]
    peak = int(redis.get(f"{p}:peak"))
    wall = float(redis.get(f"{p}:t1")) - float(redis.get(f"{p}:t0"))
    assert peak <= c, f"{peak} coroutines ran at once with --async-concurrency {c}"
    assert peak >= c * 0.8, f"only {peak} at once: the loop is not filled"
    # 200 x 0.5 s in places of 50 is 4 waves: 2 s, never less; a little more for the feed on a shared machine.
    assert n / c * seconds - 0.05 <= wall < n / c * seconds + 1.5, f"wall time {wall:.2f}s"
    assert set(runs(redis, names).values()) == {1}
    wait_for(lambda: queue_counts(aq["aio"]) == (0, 0), 10, interval=0.2, what="queue empty")
    assert w.stop() == 0
    assert w.counters()["acked"] == n


# -- 4. retries and dead letters ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("queue_type", ["classic", "quorum"])
def test_async_task_failing_twice_then_succeeding_is_retried_with_delays(broker, redis, names, aq, start_async,
                                                                         queue_type):
    n = 20
    w = start_async("aio", args=("--queue-type", queue_type))
    for i in range(n):
        publish(broker, aq["aio"], "a_flaky", i)
    wait_for(lambda: len(runs(redis, names)) == n, 30, what="every flaky async task to succeed")
    assert set(attempts(redis, aq).values()) == {3}
    assert set(runs(redis, names).values()) == {1}
    wait_for(lambda: queue_counts(aq["aio"]) == (0, 0), 20, interval=0.3, what="queue empty")
    assert broker.ready(aq["aio"] + ".dead") == 0
    assert w.stop() == 0
    counters = w.counters()
    assert counters["retried"] == 2 * n and counters["acked"] == n


def test_async_task_always_failing_ends_dead_with_its_history(broker, redis, names, aq, start_async):
    start_async("aio")
    publish(broker, aq["aio"], "a_always_fail", "x")
    dl = dead_letters(broker, aq["aio"], 1)
    props, body = dl["x"]
    h = props.headers
    assert attempts(redis, aq) == {"x": 3}
    assert h["x-magne-reason"] == "task raised" and h["x-magne-retries"] == 2
    assert h["x-magne-queue"] == aq["aio"]
    assert h["x-magne-error-type"] == "ValueError"
    assert "x is broken" in h["x-magne-error-traceback"]
    assert "a_always_fail" in h["x-magne-error-traceback"], "the traceback is the coroutine's"
    assert [e["attempt"] for e in h["x-magne-history"]] == [1, 2, 3]
    assert all(e["error-type"] == "ValueError" for e in h["x-magne-history"])
    assert orjson.loads(body)["func"] == "a_always_fail"
    wait_for(lambda: queue_counts(aq["aio"]) == (0, 0), 20, interval=0.3, what="queue empty")


# -- 5. time limits ------------------------------------------------------------------------------------------------------
def test_async_task_past_its_time_limit_is_cancelled_and_dead_lettered(broker, redis, names, aq, start_async):
    w = start_async("aio")
    t0 = time.monotonic()
    publish(broker, aq["aio"], "a_limited", "late")  # time_limit=3, awaits 30 s
    wait_for(lambda: started(redis, aq).get("late") == 1, 10, what="the limited task to start")
    for i in range(20):  # the loop keeps serving others meanwhile
        publish(broker, aq["aio"], "a_record", i, 0.1)
    wait_for(lambda: len(runs(redis, names)) == 20, 10, what="other async tasks during the long one")
    assert broker.ready(aq["aio"] + ".dead") == 0 and time.monotonic() - t0 < 3, "they ran before its deadline"
    dl = dead_letters(broker, aq["aio"], 1, timeout=15)
    assert 3 <= time.monotonic() - t0 < 8
    h = dl["late"][0].headers
    assert h["x-magne-reason"] == "time limit"
    assert h["x-magne-error-type"] == "TimeLimitExceeded"
    assert cancelled(redis, aq) == {"late": 1}, "the coroutine saw its CancelledError"
    assert "late" not in runs(redis, names)
    assert any(e.get("task") == "a_limited" for e in w.events("time_limit"))
    assert not w.events("task_abandoned")
    wait_for(lambda: queue_counts(aq["aio"]) == (0, 0), 10, interval=0.2, what="queue empty")


def test_async_time_limit_is_retried_like_any_failure(broker, redis, names, aq, start_async):
    start_async("aio")
    publish(broker, aq["aio"], "a_limited_retried", "r")  # time_limit=1, max_retries=1
    dl = dead_letters(broker, aq["aio"], 1, timeout=15)
    h = dl["r"][0].headers
    assert h["x-magne-retries"] == 1
    assert [e["reason"] for e in h["x-magne-history"]] == ["time limit", "time limit"]
    assert started(redis, aq) == {"r": 2}


# -- 6. a coroutine that swallows its cancel ----------------------------------------------------------------------------
def test_coroutine_swallowing_its_cancel_is_abandoned_and_its_place_freed(broker, redis, names, aq, start_async):
    # One place on the loop: the tasks behind it run only if the abandon frees it.
    w = start_async("aio", args=("--async-concurrency", "1", "--lost-after", "1"))
    t0 = time.monotonic()
    publish(broker, aq["aio"], "a_swallow", "deaf")  # time_limit=1
    wait_for(lambda: started(redis, aq).get("deaf") == 1, 10, what="the deaf task to start")
    for i in range(10):
        publish(broker, aq["aio"], "a_record", i)
    dl = dead_letters(broker, aq["aio"], 1, timeout=15)
    assert time.monotonic() - t0 < 8
    h = dl["deaf"][0].headers
    assert h["x-magne-reason"] == "time limit"
    assert "abandoned" in h["x-magne-error-message"]
    assert cancelled(redis, aq).get("deaf", 0) >= 1, "the coroutine was cancelled first"
    ab = w.events("task_abandoned")
    assert len(ab) == 1 and ab[0]["task"] == "a_swallow"
    wait_for(lambda: len(runs(redis, names)) == 10, 10, what="the tasks behind the abandoned one")
    wait_for(lambda: queue_counts(aq["aio"]) == (0, 0), 10, interval=0.2, what="every message decided")
    assert w.proc.poll() is None
    t1 = time.monotonic()
    assert w.stop() == 0, "a warm stop does not wait for an abandoned coroutine"
    assert time.monotonic() - t1 < 5
    assert w.counters()["async_abandoned"] == 1


# -- 7. a coroutine that blocks the loop ---------------------------------------------------------------------------------
def test_blocked_loop_is_reported_and_keeps_the_connection(broker, redis, names, aq, start_async):
    # heartbeat=2: the broker drops a silent peer after ~4 s; the loop is held for 8 s.
    w = start_async("aio", url=URL.split("?")[0] + "?heartbeat=2")
    conn_before = connections_of(w.pid)
    assert len(conn_before) == 1
    publish(broker, aq["aio"], "a_block_sleep", "block", 8)
    wait_for(lambda: started(redis, aq).get("block") == 1, 10, what="the blocking task to start")
    publish(broker, aq["aio"], "a_record", "behind")
    blocked = wait_for(lambda: w.events("loop_blocked"), 5, what="the loop_blocked record")
    assert blocked[0]["task"] == "a_block_sleep"
    assert "a_block_sleep" in blocked[0]["message"]
    assert "behind" not in runs(redis, names), "nothing else runs on a held loop"
    wait_for(lambda: runs(redis, names).get("block") == 1, 15, what="the blocking task to return")
    wait_for(lambda: runs(redis, names).get("behind") == 1, 5, what="the task behind it")
    wait_for(lambda: w.events("loop_unblocked"), 5, what="the loop_unblocked record")
    assert connections_of(w.pid) == conn_before, "the same connection throughout"
    assert not w.events("connection_lost") and not w.events("reconnected")
    wait_for(lambda: queue_counts(aq["aio"]) == (0, 0), 10, interval=0.2, what="queue empty")
    assert w.stop() == 0
    assert w.counters()["acked"] == 2


def test_busy_loop_holding_the_loop_is_interrupted_past_its_time_limit(broker, redis, names, aq, start_async):
    w = start_async("aio", args=("--lost-after", "1"))
    t0 = time.monotonic()
    publish(broker, aq["aio"], "a_busy", "spin")  # time_limit=1: interrupted at about 1 + lost_after
    wait_for(lambda: started(redis, aq).get("spin") == 1, 10, what="the busy task to start")
    publish(broker, aq["aio"], "a_record", "behind")
    blocked = wait_for(lambda: w.events("loop_blocked"), 5, what="the loop_blocked record")
    assert blocked[0]["task"] == "a_busy"
    dl = dead_letters(broker, aq["aio"], 1, timeout=15)
    assert time.monotonic() - t0 < 8
    h = dl["spin"][0].headers
    assert h["x-magne-reason"] == "time limit"
    assert h["x-magne-error-type"] == "TimeLimitExceeded"
    assert "swallowed-spin" not in runs(redis, names), "except Exception must not catch the time limit"
    wait_for(lambda: runs(redis, names).get("behind") == 1, 10, what="the loop to serve others again")
    for i in range(20):
        publish(broker, aq["aio"], "a_record", i, 0.01)
    wait_for(lambda: len(runs(redis, names)) == 21, 10, what="work after the interrupt")
    wait_for(lambda: w.events("loop_unblocked"), 5, what="the loop_unblocked record")
    assert not w.events("task_abandoned")
    assert not [r for r in w.records() if "stray interrupt" in str(r.get("message"))]
    wait_for(lambda: queue_counts(aq["aio"]) == (0, 0), 10, interval=0.2, what="queue empty")
    assert w.proc.poll() is None


def test_coroutine_blocked_in_c_past_its_time_limit_is_decided_and_the_loop_resumes_after(broker, redis, names, aq,
                                                                                         start_async):
    """time.sleep cannot be interrupted: the message is decided (dead letter, time limit) while the call still
    holds the loop, and the loop serves the others once it returns; the late result is discarded."""
    w = start_async("aio", args=("--lost-after", "1"))
    t0 = time.monotonic()
    publish(broker, aq["aio"], "a_block_in_c", "c", 6)  # time_limit=1, holds the loop for 6 s
    wait_for(lambda: started(redis, aq).get("c") == 1, 10, what="the blocking task to start")
    publish(broker, aq["aio"], "a_record", "behind")
    dl = dead_letters(broker, aq["aio"], 1, timeout=10)
    decided = time.monotonic() - t0
    assert decided < 5.5, f"decided after {decided:.1f}s: it must not wait for the call to return"
    h = dl["c"][0].headers
    assert h["x-magne-reason"] == "time limit"
    assert "behind" not in runs(redis, names), "the loop is still held"
    ab = w.events("task_abandoned")
    assert len(ab) == 1 and ab[0]["task"] == "a_block_in_c"
    wait_for(lambda: runs(redis, names).get("behind") == 1, 10, what="the loop to serve others after the call")
    assert "c" not in runs(redis, names), "TimeLimitExceeded landed when time.sleep returned"
    wait_for(lambda: w.events("abandoned_returned"), 5, what="the late return to be logged")
    wait_for(lambda: queue_counts(aq["aio"]) == (0, 0), 10, interval=0.2, what="queue empty")
    assert w.stop() == 0
    assert w.counters()["acked"] == 1 and w.counters()["dead"] == 1


def test_runs_taken_behind_a_loop_held_in_c_are_not_abandoned_and_run_once(broker, redis, names, aq, start_async):
    """Issue 20: one coroutine holds the loop in C (6 s, time limit 1 s) while three runs the loop had already taken
    (time limit 1 s, max_retries 1) wait for their first step. Their clocks start at that step: none is abandoned,
    retried or dead-lettered, and each body runs exactly once (it used to run twice: abandoned, retried, and the
    abandoned run started anyway when the loop turned)."""
    q = aq["aio"]
    first = start_async("aio")  # declares the queue
    assert first.stop() == 0
    publish(broker, q, "a_block_in_c", "c", 6)
    for i in range(3):
        publish(broker, q, "a_bystander", f"b{i}")
    w = start_async("aio", args=("--lost-after", "1"), ready=False)  # one turn of the loop takes all four
    wait_for(lambda: started(redis, aq).get("c") == 1, 15, what="the blocking task to start")
    wait_for(lambda: queue_counts(q) == (0, 0), 20, interval=0.2, what="every message settled")
    dl = dead_letters(broker, q, 1)
    assert set(dl) == {"c"}, "only the run holding the loop is decided without it"
    wait_for(lambda: all(runs(redis, names).get(f"b{i}") for i in range(3)), 10, what="the three bystanders")
    assert w.stop() == 0
    assert {f"b{i}": runs(redis, names).get(f"b{i}") for i in range(3)} == {"b0": 1, "b1": 1, "b2": 1}
    assert [e["task"] for e in w.events("task_abandoned")] == ["a_block_in_c"]
    counters = w.counters()
    assert counters["acked"] == 3 and counters["dead"] == 1 and counters["retried"] == 0


def test_metrics_count_async_tasks(broker, redis, names, aq, start_async):
    from support.scrape import Scrape, metrics_url

    q = aq["aio"]
    w = start_async("aio", args=("--async-concurrency", "10", "--metrics", "127.0.0.1:0"))
    url = metrics_url(w)
    for i in range(30):
        publish(broker, q, "a_record", i)
    publish(broker, q, "a_flaky", "f1")  # fails twice, then succeeds
    publish(broker, q, "a_fail", "dead")
    publish(broker, q, "a_limited_retried", "late")  # time limit twice: dead
    wait_for(lambda: len(runs(redis, names)) == 31, 20, what="the tasks")
    wait_for(lambda: Scrape(url).get("magne_messages_dead_lettered_total", queue=q, task="a_limited_retried") == 1, 20,
             what="the time-limited task dead-lettered")
    s = Scrape(url)
    assert s.get("magne_messages_acked_total", queue=q, task="a_record") == 30
    assert s.get("magne_messages_acked_total", queue=q, task="a_flaky") == 1
    assert s.get("magne_messages_retried_total", queue=q, task="a_flaky") == 2
    assert s.get("magne_messages_dead_lettered_total", queue=q, task="a_fail") == 1
    assert s.get("magne_task_duration_seconds_count", task="a_record", outcome="success") == 30
    assert s.get("magne_task_duration_seconds_count", task="a_flaky", outcome="retry") == 2
    assert s.get("magne_task_duration_seconds_count", task="a_fail", outcome="dead") == 1
    assert s.get("magne_time_limits_total", task="a_limited_retried") == 2
    assert s.get("magne_async_concurrency") == 10
    for i in range(3):
        publish(broker, q, "a_slow", f"s{i}", 3)
    wait_for(lambda: Scrape(url).get("magne_async_tasks_running") == 3, 10, what="three coroutines running")
    publish(broker, q, "a_block_sleep", "held", 1)
    wait_for(lambda: Scrape(url).get("magne_event_loop_stalls_total") == 1, 10, what="the stall counted")
    wait_for(lambda: runs(redis, names).get("s2") == 1, 10, what="the slow coroutines")
    assert w.stop() == 0


# -- 8. shutdown ----------------------------------------------------------------------------------------------------------
def test_warm_shutdown_finishes_running_coroutines_and_gives_back_the_rest(broker, redis, names, aq, start_async):
    n = 20
    q = aq["aio"]
    w = start_async("aio", args=("--async-concurrency", "5"))
    for i in range(n):
        publish(broker, q, "a_slow", i, 2)
    wait_for(lambda: len(started(redis, aq)) == 5, 10, what="five coroutines running")
    w.signal(signal.SIGTERM)
    assert w.wait(20) == 0
    done = runs(redis, names)
    assert set(done.values()) == {1}, "no task may run twice"
    assert set(started(redis, aq)) == set(done) and len(done) == 5, "every coroutine that started finished"
    assert cancelled(redis, aq) == {}
    wait_for(lambda: queue_counts(q)[1] == 0, 10, interval=0.2, what="nothing unacked")
    ready, _ = queue_counts(q)
    assert ready + len(done) == n, f"{ready} back in the queue + {len(done)} done != {n}"
    counters = w.counters()
    assert counters["acked"] == 5


def test_cold_shutdown_cancels_coroutines_and_requeues_their_messages(broker, redis, names, aq, start_async):
    n = 8
    q = aq["aio"]
    w = start_async("aio", args=("--async-concurrency", "5"))
    for i in range(n):
        publish(broker, q, "a_slow", i, 30)
    wait_for(lambda: len(started(redis, aq)) == 5, 10, what="five coroutines running")
    w.signal(signal.SIGINT)
    wait_for(lambda: w.events("warm_shutdown"), 10, what="warm shutdown")
    w.signal(signal.SIGINT)
    assert w.wait(15) == 0
    assert w.events("cold_shutdown")
    assert runs(redis, names) == {}
    assert set(cancelled(redis, aq)) == set(started(redis, aq)), "every running coroutine saw its cancel"
    wait_for(lambda: queue_counts(q) == (n, 0), 10, interval=0.2, what="every message back in the queue")
    assert broker.ready(q + ".dead") == 0


def test_sigquit_stops_cold_and_starts_nothing_new(broker, redis, names, aq, start_async):
    """SIGQUIT with every place taken and prefetched messages waiting on the loop: the running coroutines are
    cancelled, the waiting ones must not start in the places the cancels free (they go back unstarted, and a
    coroutine started after the cold stop is never cancelled: the process exits under it), and every message
    goes back. A race between the loop and the I/O thread: it shows in about half the runs when it is there."""
    n, c, prefetch = 150, 100, 125
    q = aq["aio"]
    w = start_async("aio", args=("--async-concurrency", str(c)))  # 100 running, 25 waiting on the loop
    for i in range(n):
        publish(broker, q, "a_slow", i, 30)
    wait_for(lambda: len(started(redis, aq)) == c, 10, what=f"{c} coroutines running")
    wait_for(lambda: queue_counts(q) == (n - prefetch, prefetch), 10, interval=0.2, what="25 more prefetched")
    t0 = time.monotonic()
    w.signal(signal.SIGQUIT)
    assert w.wait(15) == 0
    took = time.monotonic() - t0
    assert runs(redis, names) == {}
    assert len(started(redis, aq)) == c, f"coroutines started after the cold stop: {sorted(started(redis, aq))}"
    assert set(cancelled(redis, aq)) == set(started(redis, aq))
    assert took < 2.5, f"cancelled coroutines end at once; the stop took {took:.1f}s"
    wait_for(lambda: queue_counts(q) == (n, 0), 10, interval=0.2, what="every message back in the queue")


def test_cold_shutdown_with_the_loop_blocked_requeues(broker, redis, names, aq, start_async):
    """A coroutine in time.sleep cannot see a cancel: the cold stop closes anyway and the broker requeues."""
    q = aq["aio"]
    w = start_async("aio")
    publish(broker, q, "a_block_sleep", "held", 30)
    publish(broker, q, "a_slow", "waiting", 30)
    wait_for(lambda: started(redis, aq).get("held") == 1, 10, what="the blocking coroutine to start")
    w.signal(signal.SIGINT)
    wait_for(lambda: w.events("warm_shutdown"), 10, what="warm shutdown")
    w.signal(signal.SIGINT)
    assert w.wait(15) == 0
    assert runs(redis, names) == {}
    wait_for(lambda: queue_counts(q) == (2, 0), 10, interval=0.2, what="both messages back in the queue")
    assert broker.ready(q + ".dead") == 0


def test_warm_shutdown_waits_for_a_blocked_loop_with_heartbeats_flowing(broker, redis, names, aq, start_async):
    q = aq["aio"]
    w = start_async("aio", url=URL.split("?")[0] + "?heartbeat=1")
    publish(broker, q, "a_block_sleep", "held", 5)
    wait_for(lambda: started(redis, aq).get("held") == 1, 10, what="the blocking coroutine to start")
    w.signal(signal.SIGTERM)
    # The warm stop waits 5 s for the task: more than twice what the broker allows a silent peer.
    assert w.wait(20) == 0
    assert runs(redis, names) == {"held": 1}
    assert w.counters()["acked"] == 1
    assert not w.events("connection_lost") and not w.events("reconnected")
    wait_for(lambda: queue_counts(q) == (0, 0), 10, interval=0.2, what="queue empty")


def test_shutdown_timeout_turns_warm_into_cold_for_coroutines(broker, redis, names, aq, start_async):
    q = aq["aio"]
    w = start_async("aio", args=("--shutdown-timeout", "1"))
    publish(broker, q, "a_slow", "stuck", 30)
    wait_for(lambda: started(redis, aq).get("stuck") == 1, 10, what="the coroutine to start")
    w.signal(signal.SIGTERM)
    assert w.wait(15) == 0
    assert "shutdown timeout of 1s passed; stopping cold" in w.log()
    assert cancelled(redis, aq) == {"stuck": 1}
    wait_for(lambda: queue_counts(q) == (1, 0), 10, interval=0.2, what="the message back in the queue")


# -- 9. a queue of both kinds ---------------------------------------------------------------------------------------------
def test_mixed_queue_runs_both_kinds_and_warns(broker, redis, names, aq, start_async):
    q = aq["mixed"]
    w = start_async("mixed", args=("--threads", "2"))
    warned = w.events("mixed_queue")
    assert len(warned) == 1 and warned[0]["queue"] == q
    for i in range(30):
        publish(broker, q, "m_sync", i)
        publish(broker, q, "m_async", i)
    wait_for(lambda: len(runs(redis, names)) == 60, 20, what="both kinds of tasks on one queue")
    assert set(runs(redis, names).values()) == {1}
    wait_for(lambda: queue_counts(q) == (0, 0), 10, interval=0.2, what="queue empty")
    assert w.stop() == 0
    assert w.counters()["acked"] == 60


def test_mixed_queue_async_failure_and_time_limit_are_decided(broker, redis, names, aq, start_async):
    """The async task a pool thread hands over is still the loop's: its failure is dead-lettered from there."""
    q = aq["mixed"]
    start_async("mixed", args=("--threads", "2"))
    publish(broker, q, "m_async", "ok")
    publish(broker, q, "m_async", "a", "b", "c")  # wrong arguments
    publish(broker, q, "m_async_limited", "late")  # time_limit=1
    dl = dead_letters(broker, q, 2, timeout=15)
    assert dl["a"][0].headers["x-magne-reason"] == "wrong arguments"
    assert dl["late"][0].headers["x-magne-reason"] == "time limit"
    assert dl["late"][0].headers["x-magne-error-type"] == "TimeLimitExceeded"
    assert cancelled(redis, aq) == {"late": 1}
    wait_for(lambda: runs(redis, names).get("async-ok") == 1, 10, what="the good async task")


# -- 10. bad input on an async queue -----------------------------------------------------------------------------------------
def test_bad_inputs_on_an_async_queue_are_dead_lettered_and_the_worker_keeps_going(broker, redis, names, aq,
                                                                                    start_async):
    q = aq["aio"]
    w = start_async("aio")
    bad = {
        "json": (b"{not json", "bad message"),
        "array": (b"[1, 2, 3]", "bad message"),
        "unknown": (task_body("no_such_task", 1), "bad message"),
        "module-path": (orjson.dumps({"func": "os.system", "args": ["echo pwned"]}), "bad message"),
        "arity": (task_body("a_record", 1, 2, 3, 4), "wrong arguments"),
        "kwarg": (task_body("a_record", 1, nope=2), "wrong arguments"),
        "raises": (task_body("a_fail", 7), "task raised"),
    }
    for key, (body, _) in bad.items():
        broker.publish(q, q, body, message_id=key)
    publish(broker, q, "a_record", "after")
    wait_for(lambda: runs(redis, names).get("after") == 1, 20, what="a good task after the bad ones")
    dead = q + ".dead"
    wait_for(lambda: broker.ready(dead) == len(bad), 20, what="all bad messages in the dead-letter queue")
    got = {props.message_id: (props, body) for props, body in broker.get_all(dead)}
    assert set(got) == set(bad)
    for key, (body, reason) in bad.items():
        props, dl_body = got[key]
        assert dl_body == body, key
        assert props.headers["x-magne-reason"] == reason, key
        assert props.headers["x-magne-queue"] == q
    assert got["raises"][0].headers["x-magne-error-type"] == "ValueError"
    assert "async failing on purpose" in got["raises"][0].headers["x-magne-error-traceback"]
    assert "unknown task 'os.system'" in got["module-path"][0].headers["x-magne-error-message"]
    wait_for(lambda: queue_counts(q) == (0, 0), 10, interval=0.2, what="queue empty")
    assert w.proc.poll() is None, "the worker must survive every bad message"


def test_coroutine_raising_base_exceptions_is_a_task_failure_and_the_loop_goes_on(broker, redis, names, aq,
                                                                                  start_async):
    q = aq["aio"]
    kinds = ["SystemExit", "KeyboardInterrupt", "GeneratorExit", "CancelledError"]
    w = start_async("aio", args=("--async-concurrency", "2"))
    for i, kind in enumerate(kinds):
        publish(broker, q, "a_raise_base", i, kind)
    for i in range(4):
        publish(broker, q, "a_record", f"normal-{i}")
    wait_for(lambda: all(runs(redis, names).get(f"normal-{i}") == 1 for i in range(4)), 10,
             what="the normal tasks after the BaseExceptions")
    got = dead_letters(broker, q, len(kinds), timeout=10)
    for i, kind in enumerate(kinds):
        h = got[str(i)][0].headers
        assert h["x-magne-reason"] == "task raised", kind
        assert h["x-magne-error-type"] == kind, kind
    assert started(redis, aq) == {str(i): 1 for i in range(len(kinds))}
    assert w.proc.poll() is None
    t0 = time.monotonic()
    assert w.stop() == 0
    assert time.monotonic() - t0 < 5


def test_thread_task_published_to_an_async_queue_still_runs(broker, redis, names, aq, start_async):
    q = aq["aio"]
    w = start_async("aio", args=("--threads", "2"))
    for i in range(10):
        publish(broker, q, "s_record", f"sync-{i}")  # a thread task, on the queue the loop is fed
        publish(broker, q, "a_record", f"async-{i}")
    wait_for(lambda: len(runs(redis, names)) == 20, 20, what="thread and async tasks from the async queue")
    assert set(runs(redis, names).values()) == {1}
    assert broker.ready(q + ".dead") == 0
    wait_for(lambda: queue_counts(q) == (0, 0), 10, interval=0.2, what="queue empty")
    assert w.stop() == 0
    assert w.counters()["acked"] == 20


def test_hooks_see_async_runs_as_they_see_thread_runs(broker, redis, names, aq, start_worker):
    q, sq = aq["aio"], aq["sync"]
    w = start_worker("--queues", q, sq, modules=("async_tasks",), env={"MAGNE_TEST_ASYNC_HOOKS": "1"})
    w.wait_ready()
    publish(broker, q, "a_record", "ok")
    publish(broker, q, "a_fail", "bad")
    publish(broker, q, "a_limited_retried", "late")  # time limit, one retry, then dead
    publish(broker, sq, "s_record", "thread")
    dead_letters(broker, q, 2, timeout=15)
    wait_for(lambda: runs(redis, names).get("ok") == 1 and runs(redis, names).get("thread") == 1, 10,
             what="the successes")
    seen = wait_for(lambda: (h := hash_of(redis, f"{aq['prefix']}:hooks")).get("dead:a_limited_retried:late") and h,
                    10, what="the hooks of the dead letter")
    expected = {
        "before:a_record:ok": 1, "success:a_record:ok": 1, "run:a_record:success": 1,
        "before:s_record:thread": 1, "success:s_record:thread": 1, "run:s_record:success": 1,
        "before:a_fail:bad": 1, "failure:a_fail:bad:ValueError": 1, "dead:a_fail:bad": 1, "run:a_fail:dead": 1,
        "before:a_limited_retried:late": 2, "failure:a_limited_retried:late:TimeLimitExceeded": 2,
        "run:a_limited_retried:retry": 1, "run:a_limited_retried:dead": 1, "dead:a_limited_retried:late": 1,
    }
    assert seen == expected
    assert w.stop() == 0


# -- processes --------------------------------------------------------------------------------------------------------------
def test_two_processes_run_async_tasks_on_two_connections(broker, redis, names, aq, start_worker):
    q = aq["aio"]
    w = start_worker("--processes", "2", "--async-concurrency", "10", "--queues", q, modules=("async_tasks",))
    wait_for(lambda: len(w.events("ready")) == 2, 30, what="two ready workers")
    wait_for(lambda: len(connections_named(q)) == 2, 15, what="two connections")
    for i in range(300):
        publish(broker, q, "a_record", i, 0.02)
    wait_for(lambda: len(runs(redis, names)) == 300, 20, what="the tasks on two processes")
    assert set(runs(redis, names).values()) == {1}
    assert len(connections_named(q)) == 2
    w.signal(signal.SIGTERM)
    assert w.wait(30) == 0
    wait_for(lambda: queue_counts(q) == (0, 0), 10, interval=0.2, what="queue empty")


def test_sighup_reload_under_async_load_loses_nothing_and_runs_nothing_twice(broker, redis, names, aq, start_worker):
    n = 1000
    q = aq["aio"]
    w = start_worker("--processes", "2", "--async-concurrency", "10", "--queues", q, modules=("async_tasks",))
    wait_for(lambda: len(w.events("ready")) == 2, 30, what="two ready workers")
    for i in range(n):  # 2 x 10 places x 0.05 s: about 400 tasks/s, so the reload lands mid-stream
        publish(broker, q, "a_record", i, 0.05)
    wait_for(lambda: len(runs(redis, names)) >= n // 5, 20, what="some progress")
    w.signal(signal.SIGHUP)
    wait_for(lambda: w.log().count("stopped after reload") == 2, 30, what="the old workers to stop after the reload")
    wait_for(lambda: len(runs(redis, names)) == n, 20, what="every task after the reload")
    assert set(runs(redis, names).values()) == {1}, "a warm reload runs nothing twice"
    wait_for(lambda: queue_counts(q) == (0, 0), 10, interval=0.2, what="queue empty")
    assert not w.events("connection_lost"), [e["message"] for e in w.events("connection_lost")][:2]
    w.signal(signal.SIGTERM)
    assert w.wait(30) == 0


# -- 11. uvloop ---------------------------------------------------------------------------------------------------------------
def test_uvloop_runs_async_tasks_and_their_time_limits(broker, redis, names, aq, start_async):
    pytest.importorskip("uvloop")
    q = aq["aio"]
    w = start_async("aio", args=("--event-loop", "uvloop", "--async-concurrency", "20"))
    publish(broker, q, "a_limited_retried", "limited")  # time_limit=1, one retry: dead after ~2 s
    for i in range(100):
        publish(broker, q, "a_record", i, 0.05)
    wait_for(lambda: len(runs(redis, names)) == 100, 20, what="async tasks on uvloop")
    assert set(runs(redis, names).values()) == {1}
    dl = dead_letters(broker, q, 1, timeout=15)
    assert dl["limited"][0].headers["x-magne-reason"] == "time limit"
    wait_for(lambda: queue_counts(q) == (0, 0), 10, interval=0.2, what="queue empty")
    assert w.stop() == 0
    assert w.counters()["acked"] == 100


def test_bad_event_loop_option_is_a_clear_error(names, aq, start_worker):
    w = start_worker("--event-loop", "trio", modules=("async_tasks",))
    assert w.wait(30) == 2
    assert "trio" in w.log()
