"""magne.asyncpool without a broker: the real Pool and AsyncPool, deliveries made by hand, outcomes collected.

The watchdog (`check`) is called here by the test's own thread, as the worker's main thread calls it.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import functools
import threading
import time
from collections.abc import Iterator
from queue import SimpleQueue
from typing import Any

import pytest

from magne import wire
from magne.amqp import codec
from magne.asyncpool import AsyncPool
from magne.delivery import Delivery, Outcome
from magne.errors import ConfigError, RegistryError
from magne.hooks import HookSet
from magne.pool import Pool
from magne.registry import Task, task

events: list[str] = []
state: dict[str, Any] = {"running": 0, "most": 0}


async def ap_sleep(s: float, label: str = "") -> None:
    state["running"] += 1
    state["most"] = max(state["most"], state["running"])
    try:
        await asyncio.sleep(s)
    finally:
        state["running"] -= 1
    events.append(f"slept {label}")


async def ap_stubborn(s: float) -> None:
    try:
        await asyncio.sleep(s)
    except asyncio.CancelledError:
        events.append("cancel swallowed")
        await asyncio.sleep(s)  # ignores the cancel


async def ap_spin(s: float) -> None:
    end = time.monotonic() + s
    try:
        while time.monotonic() < end:  # blocks the loop in Python code
            pass
    except BaseException as exc:
        events.append(f"spin stopped by {type(exc).__name__}")
        raise


async def ap_fail() -> None:
    raise ValueError("nope")


def ap_sync(label: str) -> None:
    events.append(f"sync {label} on {threading.current_thread().name}")


TASKS = {t.name: t for t in (
    Task(ap_sleep, "ap_sleep", "AP_A", time_limit=5.0),
    Task(ap_stubborn, "ap_stubborn", "AP_A", time_limit=0.2),
    Task(ap_spin, "ap_spin", "AP_A", time_limit=0.2),
    Task(ap_fail, "ap_fail", "AP_A"),
    Task(ap_sync, "ap_sync", "AP_S"),
)}


class Harness:
    def __init__(self, concurrency: int = 10, lost_after: float = 0.3, tasks: dict[str, Task] | None = None) -> None:
        self.reported: SimpleQueue[Delivery] = SimpleQueue()
        self.work: SimpleQueue[Delivery | None] = SimpleQueue()
        self.pool = Pool(2, tasks or TASKS, self.work, self.reported.put, time_limit=5.0, lost_after=lost_after,
                         hooks=HookSet([]))
        self.aio = self.pool.aio = AsyncPool(self.pool.runner, self.work.put, concurrency)
        self.tags = iter(range(1, 10**6))
        self.stop = threading.Event()
        self.watchdog = threading.Thread(target=self._watch, daemon=True)

    def _watch(self) -> None:
        while not self.stop.wait(0.02):
            self.aio.check(time.monotonic())
            self.pool.check(time.monotonic())

    def delivery(self, name: str, *args: Any, queue: str = "AP_A", body: bytes | None = None) -> Delivery:
        mid = wire.new_id()
        header = codec.header_payload(wire.properties_for(mid), 0)
        return Delivery(next(self.tags), 1, queue, body if body is not None else wire.encode(name, args, {}, mid),
                        header, False)

    def wait_busy(self, n: int, timeout: float = 5.0) -> None:
        deadline = time.monotonic() + timeout
        while self.aio.busy() < n and time.monotonic() < deadline:
            time.sleep(0.01)

    def outcomes(self, n: int, timeout: float = 10.0) -> list[Delivery]:
        deadline = time.monotonic() + timeout
        out = []
        while len(out) < n:
            left = deadline - time.monotonic()
            assert left > 0, f"only {len(out)} of {n} outcomes in {timeout}s: {out}"
            try:
                out.append(self.reported.get(timeout=left))
            except Exception:
                continue
        return out


@contextlib.contextmanager
def running(start_loop: bool = True, watchdog: bool = False, **kwargs: Any) -> Iterator[Harness]:
    """A Harness with its pool (and unless told otherwise its loop) started; everything stopped afterwards."""
    events.clear()
    state.update(running=0, most=0)
    harness = Harness(**kwargs)
    harness.pool.start()
    if start_loop:
        harness.aio.start()
    if watchdog:
        harness.watchdog.start()
    try:
        yield harness
    finally:
        harness.stop.set()
        harness.pool.stop()
        harness.aio.stop()
        harness.aio.join(2.0)


@pytest.fixture
def h() -> Iterator[Harness]:
    with running(watchdog=True) as harness:
        yield harness


def test_an_async_task_runs_on_the_loop_and_is_acked(h: Harness) -> None:
    h.aio.put(h.delivery("ap_sleep", 0.01, "one"))
    [d] = h.outcomes(1)
    assert d.outcome is Outcome.ACK and d.task == "ap_sleep"
    assert events == ["slept one"]


def test_concurrency_is_capped_and_every_message_runs(h: Harness) -> None:
    start = time.monotonic()
    for i in range(40):
        h.aio.put(h.delivery("ap_sleep", 0.2, str(i)))
    out = h.outcomes(40)
    took = time.monotonic() - start
    assert all(d.outcome is Outcome.ACK for d in out)
    assert state["most"] == 10  # --async-concurrency 10
    assert 0.75 < took < 3.0  # four waves of 0.2 s, not forty


def test_a_time_limit_cancels_the_coroutine_and_fails_the_message(h: Harness) -> None:
    TASKS["ap_sleep"].time_limit = 0.2
    try:
        h.aio.put(h.delivery("ap_sleep", 5.0, "late"))
        h.aio.put(h.delivery("ap_sleep", 0.01, "on time"))
        out = {d.reason or "ok": d for d in h.outcomes(2)}
    finally:
        TASKS["ap_sleep"].time_limit = 5.0
    assert out["ok"].outcome is Outcome.ACK
    late = out["time limit"]
    assert late.outcome is Outcome.DEAD and "time limit of 0.2s" in late.error["message"]
    assert h.aio.time_limits == {"ap_sleep": 1} and h.aio.busy() == 0


def test_a_coroutine_that_swallows_the_cancel_is_abandoned_and_the_loop_goes_on(h: Harness) -> None:
    h.aio.put(h.delivery("ap_stubborn", 3.0))
    [d] = h.outcomes(1, timeout=3.0)  # 0.2 s limit + 0.3 s lost_after, not the 3 s it would take
    assert d.outcome is Outcome.DEAD and d.reason == "time limit" and "abandoned" in d.error["message"]
    assert events == ["cancel swallowed"] and h.aio.abandoned == 1
    h.aio.put(h.delivery("ap_sleep", 0.01, "after"))
    [d2] = h.outcomes(1)
    assert d2.outcome is Outcome.ACK


def test_a_coroutine_blocking_the_loop_is_reported_and_interrupted(h: Harness) -> None:
    h.aio.put(h.delivery("ap_spin", 30.0))
    h.aio.put(h.delivery("ap_sleep", 0.01, "waiting behind it"))
    out = h.outcomes(2, timeout=5.0)
    by_task = {d.task: d for d in out}
    assert by_task["ap_spin"].outcome is Outcome.DEAD and by_task["ap_spin"].reason == "time limit"
    assert by_task["ap_sleep"].outcome is Outcome.ACK
    assert "spin stopped by TimeLimitExceeded" in events
    assert h.aio.stalls == 1


def test_a_failing_coroutine_is_dead_lettered_with_its_error(h: Harness) -> None:
    h.aio.put(h.delivery("ap_fail"))
    [d] = h.outcomes(1)
    assert d.outcome is Outcome.DEAD and d.reason == "task raised" and "nope" in d.error["message"]


def test_bad_messages_and_thread_tasks_reaching_the_loop(h: Harness) -> None:
    h.aio.put(h.delivery("", body=b"\xff not json"))
    h.aio.put(h.delivery("no_such_task"))
    h.aio.put(h.delivery("ap_sync", "x", queue="AP_A"))  # a thread task on an async queue: the pool runs it
    out = {d.task or "?": d for d in h.outcomes(3)}
    assert out["?"].outcome is Outcome.DEAD and out["?"].reason == "bad message"
    assert out["no_such_task"].outcome is Outcome.DEAD
    assert out["ap_sync"].outcome is Outcome.ACK
    assert [e for e in events if e.startswith("sync x on worker-")]


def test_the_pool_hands_async_tasks_it_decodes_to_the_loop(h: Harness) -> None:
    h.work.put(h.delivery("ap_sleep", 0.01, "via pool", queue="AP_S"))
    [d] = h.outcomes(1)
    assert d.outcome is Outcome.ACK and events == ["slept via pool"]


def test_take_unstarted_returns_what_waits_for_a_place() -> None:
    with running(concurrency=1) as harness:
        first = harness.delivery("ap_sleep", 0.5, "first")
        harness.aio.put(first)
        waiting = [harness.delivery("ap_sleep", 0.01, str(i)) for i in range(3)]
        old = harness.delivery("ap_sleep", 0.01, "old generation")
        old.gen = 0
        for d in [*waiting, old]:
            harness.aio.put(d)
        harness.wait_busy(1)
        taken = harness.aio.take_unstarted(1)
        assert [d.tag for d in taken] == [d.tag for d in waiting]  # the old generation's is dropped
        [d] = harness.outcomes(1)
        assert d is first


def test_a_cold_stop_cancels_running_coroutines_and_requeues_them(h: Harness) -> None:
    for i in range(3):
        h.aio.put(h.delivery("ap_sleep", 5.0, str(i)))
    h.wait_busy(3)
    h.aio.interrupt_all()
    out = h.outcomes(3)
    assert {d.outcome for d in out} == {Outcome.REQUEUE}


def test_without_a_loop_the_pool_runs_an_async_task_to_the_end_itself() -> None:
    events.clear()
    reported: SimpleQueue[Delivery] = SimpleQueue()
    pool = Pool(1, TASKS, SimpleQueue(), reported.put, hooks=HookSet([]))
    d = Harness().delivery("ap_sleep", 0.01, "inline")
    assert pool.run_one(d).outcome is Outcome.ACK
    assert events == ["slept inline"]


def test_settings_are_checked() -> None:
    pool = Pool(1, TASKS, SimpleQueue(), lambda d: None, hooks=HookSet([]))
    with pytest.raises(ConfigError, match="async-concurrency"):
        AsyncPool(pool.runner, pool.work.put, 0)
    with pytest.raises(ConfigError, match="event-loop"):
        AsyncPool(pool.runner, pool.work.put, 1, "trio")


def test_generator_functions_are_refused_and_async_ones_registered() -> None:
    def gen():  # pragma: no cover - never called
        yield 1

    with pytest.raises(RegistryError, match="generator"):
        task(name="ap_gen")(gen)

    async def coro(x: int) -> int:
        return x * 2

    t = task(name="ap_coro_ok")(coro)
    assert t.is_async and t.blocking(21) == 42
    assert asyncio.run(t(2)) == 4  # calling the task itself gives the coroutine


def test_messages_put_before_the_loop_starts_run_once_it_does() -> None:
    """The I/O thread consumes before the worker starts the loop: a queue with waiting messages hands them over
    first (found by the e2e tests: the first put used to fail and leave the loop unfed for good)."""
    with running(start_loop=False) as harness:
        for i in range(3):
            harness.aio.put(harness.delivery("ap_sleep", 0.01, str(i)))
        harness.aio.start()
        assert {d.outcome for d in harness.outcomes(3)} == {Outcome.ACK}
        harness.aio.put(harness.delivery("ap_sleep", 0.01, "later"))
        assert harness.outcomes(1)[0].outcome is Outcome.ACK


def test_a_cold_stop_starts_nothing_that_was_waiting() -> None:
    with running(concurrency=2) as harness:
        for i in range(5):
            harness.aio.put(harness.delivery("ap_sleep", 5.0, str(i)))
        harness.wait_busy(2)
        harness.aio.interrupt_all()
        assert {d.outcome for d in harness.outcomes(2)} == {Outcome.REQUEUE}
        time.sleep(0.2)  # a wrongly started coroutine would be running by now
        assert harness.aio.busy() == 0 and len(harness.aio.inbox) == 3


def _hide(fn):
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        return fn(*args, **kwargs)  # returns the coroutine: not an async def itself

    return wrapper


def test_async_functions_behind_decorators_or_as_objects_are_recognised() -> None:
    def keeps(fn):
        @functools.wraps(fn)
        async def wrapper(*args, **kwargs):
            return await fn(*args, **kwargs)

        return wrapper

    class Handler:
        async def __call__(self, x: int) -> int:
            return x + 1

    assert task(name="ap_wrapped")(keeps(ap_fail)).is_async
    assert task(name="ap_handler")(Handler()).is_async
    assert task(Handler()).name == "Handler"  # no __name__: its class's
    task(Handler())  # the same origin again: no "two tasks are named" error
    assert task(name="ap_partial")(functools.partial(ap_sleep, 0.0)).is_async
    assert task(name="ap_unwrapped_sync_wrapper")(_hide(ap_fail)).is_async  # functools.wraps leads to the coroutine
    assert not task(name="ap_plain")(ap_sync).is_async


def test_a_coroutine_returned_by_a_plain_function_is_never_acked() -> None:
    """A wrapper that hides its coroutine function entirely: the pool must not drop the coroutine and ack."""

    def opaque(*args: Any) -> Any:
        return ap_sleep(*args)

    tasks = {"ap_opaque": Task(opaque, "ap_opaque", "AP_S")}
    pool = Pool(1, tasks, SimpleQueue(), lambda d: None, hooks=HookSet([]))
    d = Harness().delivery("ap_opaque", 0.01)
    out = pool.run_one(d)
    assert out.outcome is Outcome.DEAD and out.reason == "bad message"
    assert "returned coroutine instead of running" in out.error["message"]


def test_contextvars_do_not_leak_from_one_run_into_the_next() -> None:
    seen: list[Any] = []
    var: contextvars.ContextVar[str | None] = contextvars.ContextVar("ap_var", default=None)

    async def ap_ctx(label: str) -> None:
        seen.append(var.get())
        var.set(label)

    with running(concurrency=1, tasks={**TASKS, "ap_ctx": Task(ap_ctx, "ap_ctx", "AP_A")}) as harness:
        for label in ("a", "b", "c"):
            harness.aio.put(harness.delivery("ap_ctx", label))
        harness.outcomes(3)
        assert seen == [None, None, None]


@pytest.mark.parametrize("how", ["loop.stop", "SystemExit"])
def test_task_code_cannot_end_the_loop_thread(h: Harness, how: str) -> None:
    async def ap_killer() -> None:
        if how == "loop.stop":
            asyncio.get_running_loop().stop()
        else:
            async def bg() -> None:
                raise SystemExit(3)

            background.append(asyncio.get_running_loop().create_task(bg()))
        await asyncio.sleep(0.05)

    background: list[asyncio.Task[None]] = []
    TASKS["ap_killer"] = Task(ap_killer, "ap_killer", "AP_A")
    try:
        h.aio.put(h.delivery("ap_killer"))
        h.outcomes(1)
        for t in background:  # retrieved, so asyncio does not format its traceback at a random moment later:
            t.exception()  # CPython 3.11's traceback carets parse source with ast, which is unsafe across threads
        h.aio.put(h.delivery("ap_sleep", 0.01, "after"))
        [d] = h.outcomes(1)
        assert d.outcome is Outcome.ACK and not h.aio.dead()
    finally:
        del TASKS["ap_killer"]


def test_sync_mode_inside_a_running_event_loop_runs_async_tasks() -> None:
    async def inside() -> Any:
        return task(name="ap_double")(_double).blocking(21)

    assert asyncio.run(inside()) == 42


async def _double(x: int) -> int:
    await asyncio.sleep(0)
    return x * 2


def test_a_failing_after_run_hook_does_not_hide_the_failure_from_after_failure() -> None:
    """The failure hooks of both kinds go through Runner.after_failure: a raising after_run must not lose the
    run's exception on its way to after_failure (an `except ... as exc` in the hook loop used to unbind it)."""
    from magne import hooks

    seen: list[Any] = []

    class Hooks(hooks.Hook):
        def after_run(self, task: str, outcome: str, seconds: float) -> None:
            raise RuntimeError("a broken metrics hook")

        def after_failure(self, run: hooks.TaskRun) -> None:
            seen.append((run.task_name, type(run.exception).__name__, run.decision))

    pool = Pool(1, TASKS, SimpleQueue(), lambda d: None, hooks=HookSet([Hooks()]))
    out = pool.run_one(Harness().delivery("ap_fail"))
    assert out.outcome is Outcome.DEAD
    assert seen == [("ap_fail", "ValueError", "dead")]
