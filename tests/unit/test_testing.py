"""magne.testing: tasks run in-process, through the pool's own path, with delays on a simulated clock."""

from __future__ import annotations

import asyncio
import collections
import subprocess
import sys
import threading
import time

import pytest

from magne import publisher, task, wire
from magne.amqp import codec
from magne.registry import Task
from magne.testing import TooManyMessages, worker

attempts: collections.Counter[str] = collections.Counter()
received: list[tuple[str, list, dict]] = []
lock = threading.Lock()


@task
def tt_add(x, y):
    with lock:
        received.append(("tt_add", [x, y], {}))
    return x + y


@task(max_retries=3, min_backoff=1, max_backoff=10)
def tt_flaky(key, fail_times):
    with lock:
        attempts[key] += 1
        n = attempts[key]
    if n <= fail_times:
        raise ConnectionError(f"attempt {n} of {key} failed")


@task
def tt_broken(key):
    raise RuntimeError(f"{key} is broken")


@task(max_retries=1)
def tt_broken_once(key):
    raise RuntimeError(f"{key} is broken")


@task
def tt_record(label):
    with lock:
        received.append(("tt_record", [label], {}))


@task
def tt_fan_out(n):
    for i in range(n):
        tt_record.send(f"child-{i}")


@task
def tt_forever(i):
    tt_forever.send(i + 1)


@task
def tt_raises_type_error(x):
    return x + "a string"  # right arguments, wrong types inside: the task's own failure


@task(time_limit=0.1)
def tt_spins():
    while True:
        pass


@task(max_retries=2, min_backoff=1, max_backoff=10)
async def tt_async_flaky(key, fail_times):
    await asyncio.sleep(0)
    with lock:
        attempts[key] += 1
        n = attempts[key]
    if n <= fail_times:
        raise ConnectionError(f"async attempt {n} of {key} failed")
    tt_record.send(f"async {key} done")


@pytest.fixture(autouse=True)
def _clean():
    attempts.clear()
    received.clear()


MODES = pytest.mark.parametrize("threads", [0, 1, 8], ids=["sync", "1-thread", "8-threads"])


@MODES
def test_retries_end_in_success_with_history_and_compressed_delays(threads):
    start = time.monotonic()
    with worker(threads) as w:
        mid = tt_flaky.send("k1", 2)
        w.join()
    assert time.monotonic() - start < 2  # backoffs of about 1 s and 2 s passed on the simulated clock
    [ok] = w.succeeded(tt_flaky)
    assert ok.message_id == mid and ok.retries == 2
    assert [(a["attempt"], a["reason"], a["error-type"], a["error-message"]) for a in ok.attempts] == [
        (1, "task raised", "ConnectionError", "attempt 1 of k1 failed"),
        (2, "task raised", "ConnectionError", "attempt 2 of k1 failed")]
    first, second = w.retried
    assert (first.retries, second.retries) == (0, 1) and first.message_id == second.message_id == mid
    assert first.headers[wire.RETRIES] == 1 and second.headers[wire.RETRIES] == 2
    assert len(second.headers[wire.HISTORY]) == 2
    assert 1.0 <= first.delay <= 2.0 and 2.0 <= second.delay <= 4.0  # min_backoff 1 (a minimum) with equal jitter
    assert ok.at == pytest.approx(first.delay + second.delay) == pytest.approx(w.clock)
    assert attempts["k1"] == 3 and w.dead_letters() == []


@MODES
def test_always_failing_is_dead_lettered_with_reason_and_attempts(threads):
    with worker(threads, max_retries=2, min_backoff=5) as w:  # worker-level default: tt_broken sets no retries
        tt_broken.send("k2")
        tt_broken_once.send("k3")  # its own max_retries=1 wins over the worker's 2
        w.join()
    [dead] = w.failed(tt_broken)
    assert (dead.reason, dead.error_type, dead.error_message, dead.retries) == ("task raised", "RuntimeError",
                                                                                 "k2 is broken", 2)
    assert "tt_broken" in dead.traceback and "RuntimeError: k2 is broken" in dead.traceback
    assert [a["attempt"] for a in dead.attempts] == [1, 2, 3]
    assert dead.headers[wire.REASON] == "task raised" and dead.headers[wire.RETRIES] == 2
    assert dead.headers[wire.TASK] == "tt_broken" and dead.headers[wire.QUEUE] == "TT_BROKEN"
    assert len(w.retried) == 3
    [once] = w.dead_letters("tt_broken_once")
    assert once.retries == 1 and len(once.attempts) == 2
    assert w.dead_letters() == w.failed() and len(w.dead_letters()) == 2


def test_a_non_json_argument_fails_at_send_time_with_productions_message():
    with worker() as w:
        for bad in (object(), float("nan"), {1, 2}):
            with pytest.raises(TypeError) as caught:
                tt_add.send(bad, 1)
            with pytest.raises(TypeError) as direct:  # what production's send() runs: the same function
                wire.encode("tt_add", [bad, 1], None, "x")
            assert str(caught.value) == str(direct.value)
            assert str(caught.value).startswith("arguments of task 'tt_add' are not JSON-serializable")
        w.join()
    assert w.sent == [] and w.runs == []


@MODES
def test_unknown_task_and_wrong_arguments_are_dead_lettered_with_productions_reasons(threads):
    ghost = Task(lambda: None, "tt_not_registered", "TT_ADD")  # a task this worker does not know
    with worker(threads) as w:
        ghost.send(1)
        tt_add.send(1)  # missing y
        tt_add.send(1, 2, z=3)  # unexpected z
        tt_raises_type_error.send(1)  # binds: a TypeError inside is the task's failure
        publisher.default_publisher().publish("TT_ADD", b"not json", wire.properties_for("raw-1"))
        w.join()
    by_task = {(r.task, r.error_type): r for r in w.dead_letters()}
    unknown = by_task[("tt_not_registered", "BadMessage")]
    assert unknown.reason == "bad message" and unknown.traceback == "" and unknown.attempts[0]["attempt"] == 1
    assert unknown.error_message == "unknown task 'tt_not_registered': no task of that name is registered in this worker"
    wrong = w.dead_letters(tt_add)
    assert [r.reason for r in wrong] == ["wrong arguments"] * 2 and sorted(r.args for r in wrong) == [[1], [1, 2]]
    assert wrong[0].traceback == "" and wrong[0].error_type == "TypeError"
    assert by_task[("tt_raises_type_error", "TypeError")].reason == "task raised"
    [raw] = [r for r in w.dead_letters() if r.message_id == "raw-1"]
    assert raw.reason == "bad message" and raw.error_message.startswith("body is not JSON") and raw.args is None
    assert len(w.dead_letters()) == 5 and w.succeeded() == []


def _outcomes(threads):
    with worker(threads, max_retries=1, min_backoff=1) as w:
        tt_flaky.send("a", 1)
        tt_flaky.send("b", 9)
        tt_broken.send("c")
        tt_add.send(2, 3)
        tt_add.send("x")
        tt_fan_out.send(3)
        tt_add.send_with_options(args=(4, 5), delay=30)
        w.join()
    attempts.clear()
    return sorted((r.task, repr(r.args), r.outcome, r.reason, r.retries, len(r.attempts)) for r in w.runs)


def test_threads_and_sync_give_the_same_outcomes():
    sync = _outcomes(0)
    assert sync == _outcomes(8) == _outcomes(1)
    assert ("tt_flaky", "['b', 9]", "dead", "task raised", 3, 4) in sync  # the task's max_retries=3 over the worker's 1
    assert len(sync) == 15


@pytest.mark.parametrize("threads", [0, 1, 8], ids=["sync", "1-thread", "8-threads"])
def test_delayed_messages_run_in_order_of_their_due_time(threads):
    with worker(threads) as w:
        tt_record.send_with_options(args=("c",), delay=3)
        tt_record.send_with_options(args=("b",), delay=1.234)
        tt_record.send("a")
        tt_record.send_with_options(args=("d",), delay=2)
        w.join()
    assert [r[1][0] for r in received] == ["a", "b", "d", "c"]
    assert [r.at for r in w.succeeded()] == [0, 1.3, 2, 3]  # 1.234 s is rounded as production's delay queues round it
    assert [s.delay for s in w.sent] == [3, 1.234, None, 2]


def test_messages_sent_by_tasks_run_and_are_captured():
    with worker() as w:
        tt_fan_out.send(3)
        w.join()
    for i in range(3):
        w.assert_ran(tt_record, f"child-{i}")
    assert [s.task for s in w.sent] == ["tt_fan_out", "tt_record", "tt_record", "tt_record"]
    assert all(s.message_id and s.queue for s in w.sent)
    with pytest.raises(AssertionError, match="tt_record did not succeed"):
        w.assert_ran(tt_record, "child-9")


class _FakePublisher:
    def __init__(self):
        self.published = []

    def publish(self, queue, body, properties, **options):
        self.published.append((queue, body))


def test_exiting_restores_the_default_publisher_also_on_exceptions(monkeypatch):
    fake = _FakePublisher()
    monkeypatch.setattr(publisher, "_default", fake)
    with worker() as w:
        assert publisher.default_publisher() is w
        tt_add.send(1, 2)
        w.join()
    assert publisher.default_publisher() is fake and fake.published == []
    tt_add.send(3, 4)  # after the block: the process's publisher again
    assert [q for q, _b in fake.published] == ["TT_ADD"]
    with pytest.raises(KeyError), worker(threads=0):
        raise KeyError("a test failing inside the block")
    assert publisher.default_publisher() is fake
    monkeypatch.setattr(publisher, "_default", None)
    with worker(threads=0):
        pass
    assert publisher._default is None


@MODES
def test_big_integers_round_trip_exactly(threads):
    with worker(threads) as w:
        tt_add.send(2**64, -(2**70))
        w.join()
    assert received == [("tt_add", [2**64, -(2**70)], {})]
    assert all(type(a) is int for a in received[0][1])
    w.assert_ran(tt_add, 2**64, -(2**70))


@MODES
def test_raise_on_failure_reraises_the_first_final_failure(threads):
    with worker(threads, raise_on_failure=True) as w:
        tt_broken.send("k4")
        with pytest.raises(RuntimeError, match="k4 is broken"):
            w.join()
        w.join(raise_on_failure=False)
    with worker(threads) as w:
        tt_add.send(1)
        w.join()  # by default a failure is a dead letter, as in production
        with pytest.raises(TypeError):
            w.join(raise_on_failure=True)


@MODES
def test_a_task_that_sends_itself_forever_is_stopped_with_a_clear_error(threads):
    with worker(threads, max_messages=50) as w:
        tt_forever.send(0)
        with pytest.raises(TooManyMessages, match="ran 50 messages"):
            w.join()
    assert len(w.runs) <= 2 * 50  # sends before join() run too, under the same guard


def test_time_limits_fire_on_pool_threads():
    start = time.monotonic()
    with worker(2, raise_on_failure=True) as w:
        tt_spins.send()
        tt_add.send(1, 1)
        with pytest.raises(AssertionError, match="time limit") as caught:
            w.join()
    assert time.monotonic() - start < 3
    [dead] = w.dead_letters(tt_spins)
    assert (dead.reason, dead.error_type) == ("time limit", "TimeLimitExceeded")
    assert dead.error_message == "task ran past its time limit of 0.1s"
    assert type(caught.value.__cause__).__name__ == "TimeLimitExceeded"
    w.assert_ran(tt_add, 1, 1)


@pytest.mark.skipif(not hasattr(Task, "send_many"), reason="no Task.send_many in this checkout")
def test_send_many_and_send_async_are_captured_too():
    async def send_one():
        return await tt_record.send_async("async")

    with worker(sync=True) as w:
        assert w.threads == 0
        ids = tt_add.send_many([(1, 2), (3, 4)]).message_ids
        mid = asyncio.run(send_one())
        w.join()
    assert [s.message_id for s in w.sent] == [*ids, mid]
    assert [r.args for r in w.succeeded()] == [[1, 2], [3, 4], ["async"]]


def test_the_header_a_stand_in_gets_is_the_one_production_sends():
    json_header = getattr(publisher, "json_header", None)  # the real publisher writes this one by hand
    if json_header is None:
        pytest.skip("no publisher.json_header in this checkout")
    assert json_header("0123abc", 42) == codec.header_payload(wire.properties_for("0123abc"), 42)


def test_importing_magne_testing_does_not_import_pytest():
    code = ("import sys, magne.testing; assert 'pytest' not in sys.modules; "
            "from magne.testing import magne_worker; assert 'pytest' in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True)


@MODES
def test_async_def_tasks_run_with_the_same_retries(threads):
    with worker(threads) as w:
        tt_async_flaky.send("a1", 1)
        tt_async_flaky.send("a2", 5)
        w.join()
    [ok] = w.succeeded(tt_async_flaky)
    assert ok.args == ["a1", 1] and ok.retries == 1
    [dead] = w.dead_letters(tt_async_flaky)
    assert dead.args == ["a2", 5] and dead.reason == "task raised" and len(dead.attempts) == 3
    assert [r.args for r in w.succeeded(tt_record)] == [["async a1 done"]]
