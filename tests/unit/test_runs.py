"""The task-run protocol without a broker (issue 20, "Double execution and false outcomes"): when a run's clock
starts, what an abandoned run may still do, and where the hooks of `async def` runs execute.

The real Pool and AsyncPool, deliveries made by hand, outcomes collected; the watchdog (`check`) is called by the
test's own thread, as the worker's main thread calls it.
"""

from __future__ import annotations

import asyncio
import contextvars
import threading
import time
from collections.abc import Iterator
from queue import SimpleQueue
from typing import Any

import pytest

from magne import hooks, wire
from magne.amqp import codec
from magne.asyncpool import AsyncPool
from magne.delivery import Delivery, Outcome
from magne.hooks import HookSet
from magne.metrics import TaskMetrics
from magne.pool import Pool
from magne.registry import Task

bodies: dict[str, int] = {}  # label -> times its body ran (to the end)
came_back = threading.Event()


def _count(label: str) -> None:
    bodies[label] = bodies.get(label, 0) + 1


async def rt_block(label: str, seconds: float) -> None:
    """Holds the event loop inside C: no interrupt lands until time.sleep returns."""
    time.sleep(seconds)
    _count(label)


async def rt_count(label: str) -> None:
    _count(label)


def rt_stuck(label: str, seconds: float) -> None:
    """A thread task stuck in C past its time limit and its lost_after: the watchdog abandons its thread. It then
    swallows the interrupt that lands when the call returns (as code with a bare `except` does) and returns."""
    try:
        time.sleep(seconds)
    except BaseException:  # noqa: B036 - on purpose: the body comes back as if it succeeded
        pass
    _count(label)
    came_back.set()


def rt_quick(label: str) -> None:
    _count(label)


TASKS = {t.name: t for t in (
    Task(rt_block, "rt_block", "RT", time_limit=0.2),
    Task(rt_count, "rt_count", "RT", time_limit=0.2, retry_options={"max_retries": 1}),
    Task(rt_stuck, "rt_stuck", "RT", time_limit=0.1),
    Task(rt_quick, "rt_quick", "RT"),
)}

_tags = iter(range(1, 10**6))


def delivery(name: str, *args: Any) -> Delivery:
    mid = wire.new_id()
    return Delivery(next(_tags), 1, "RT", wire.encode(name, args, {}, mid), codec.header_payload(wire.properties_for(mid), 0),
                    False)


class Setup:
    """A Pool (and an AsyncPool on its side), a watchdog thread, and every reported delivery in order."""

    def __init__(self, hook_list: list[hooks.Hook], lost_after: float = 0.3, threads: int = 1) -> None:
        self.reported: SimpleQueue[Delivery] = SimpleQueue()
        self.work: SimpleQueue[Delivery | None] = SimpleQueue()
        self.pool = Pool(threads, TASKS, self.work, self.report, time_limit=5.0, lost_after=lost_after,
                         hooks=HookSet(hook_list))
        self.aio = self.pool.aio = AsyncPool(self.pool.runner, self.work.put, 10)
        self.stop = threading.Event()
        self.watchdog = threading.Thread(target=self._watch, daemon=True)
        self.on_report: list[Any] = []

    def report(self, d: Delivery) -> None:
        for fn in self.on_report:
            fn(d)
        self.reported.put(d)

    def _watch(self) -> None:
        while not self.stop.wait(0.02):
            now = time.monotonic()
            self.aio.check(now)
            self.pool.check(now)

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


@pytest.fixture
def setup_factory() -> Iterator[Any]:
    made: list[Setup] = []
    bodies.clear()
    came_back.clear()

    def make(*args: Any, **kwargs: Any) -> Setup:
        s = Setup(*args, **kwargs)
        made.append(s)
        return s

    yield make
    for s in made:
        s.stop.set()
        s.pool.stop()
        s.aio.stop()
        s.aio.join(2.0)


# -- a. bystanders of a run that blocks the event loop -------------------------------------------------------------
def test_runs_the_loop_took_but_never_started_are_not_abandoned_and_run_once(setup_factory: Any) -> None:
    """One coroutine holds the loop in C (1.5 s, its limit 0.2 s) while three runs the loop had already taken wait
    for their first step. Their clocks must not run before it: none is abandoned, none fails, each body runs once
    (with max_retries=1 a wrongly abandoned one used to be retried and run twice)."""
    s = setup_factory([], lost_after=0.3)
    s.pool.start()
    s.aio.put(delivery("rt_block", "blocker", 1.5))
    for i in range(3):
        s.aio.put(delivery("rt_count", f"by{i}"))
    s.aio.start()  # one turn takes all four: the blocker first, the three behind it, not started
    s.watchdog.start()
    outs = s.outcomes(4)
    assert sorted(f"{d.task}:{d.outcome.name}" for d in outs) == [
        "rt_block:DEAD", "rt_count:ACK", "rt_count:ACK", "rt_count:ACK"], [(d.task, d.outcome, d.reason) for d in outs]
    assert s.aio.abandoned == 1, "only the run holding the loop may be abandoned"
    deadline = time.monotonic() + 5
    while bodies.get("by2", 0) < 1 and time.monotonic() < deadline:
        time.sleep(0.01)
    s.stop.set()
    s.aio.stop()
    s.aio.join(2.0)
    assert {k: v for k, v in bodies.items() if k.startswith("by")} == {"by0": 1, "by1": 1, "by2": 1}
    assert s.reported.empty(), "no second outcome for any message"


def test_an_abandoned_run_never_starts(setup_factory: Any) -> None:
    """Whatever the watchdog decided without a run must not run afterwards: its message is already settled."""
    s = setup_factory([], lost_after=0.3)
    s.pool.start()
    s.aio.put(delivery("rt_block", "blocker", 1.5))
    s.aio.put(delivery("rt_count", "behind"))
    s.aio.start()
    s.watchdog.start()
    outs = s.outcomes(2)
    late = [d for d in outs if d.task == "rt_count"]
    assert [d.outcome for d in late] == [Outcome.ACK] and bodies.get("behind") == 1
    s.aio.stop()
    s.aio.join(2.0)
    assert bodies.get("behind") == 1 and s.reported.empty()


# -- b. a thread task abandoned by the watchdog that comes back later ----------------------------------------------
class Recorder(hooks.Hook):
    def __init__(self) -> None:
        self.seen: list[tuple[str, str]] = []

    def after_run(self, task: str, outcome: str, seconds: float) -> None:
        self.seen.append(("run", f"{task}:{outcome}"))

    def after_success(self, run: hooks.TaskRun) -> None:
        self.seen.append(("success", run.task_name))

    def after_failure(self, run: hooks.TaskRun) -> None:
        self.seen.append(("failure", f"{run.task_name}:{run.decision}"))


def test_an_abandoned_thread_that_comes_back_is_neither_a_success_nor_hooked(setup_factory: Any) -> None:
    rec = Recorder()
    metrics = TaskMetrics(TASKS)
    s = setup_factory([rec, metrics], lost_after=0.2)
    s.pool.start()
    old = s.pool.slots[0].thread
    assert old is not None
    s.watchdog.start()
    s.work.put(delivery("rt_stuck", "stuck", 1.0))
    [d] = s.outcomes(1)  # decided by the watchdog, before the thread comes back
    assert d.outcome is Outcome.DEAD and d.reason == "time limit" and "abandoned" in d.error["message"]
    assert came_back.wait(5.0), "the stuck call returned"
    old.join(5.0)
    assert not old.is_alive(), "the abandoned thread ends once it came back"
    assert ("success", "rt_stuck") not in rec.seen and ("run", "rt_stuck:success") not in rec.seen, rec.seen
    assert ("rt_stuck", "success") not in metrics.snapshot(), "counted a success for a message dead-lettered already"
    assert s.reported.empty()


def test_a_thread_is_abandoned_also_when_the_stuck_run_is_not_its_first(setup_factory: Any) -> None:
    """A pool thread's Slot is the clock of every run it makes: nothing a finished run left on it may keep the watchdog
    from abandoning a later run of that thread."""
    s = setup_factory([], lost_after=0.2)
    s.pool.start()
    s.watchdog.start()
    s.work.put(delivery("rt_quick", "first"))
    [first] = s.outcomes(1)
    assert first.outcome is Outcome.ACK
    s.work.put(delivery("rt_stuck", "second", 1.0))
    [d] = s.outcomes(1)  # decided by the watchdog, before the thread comes back
    assert d.outcome is Outcome.DEAD and d.reason == "time limit" and "abandoned" in d.error["message"]
    assert came_back.wait(5.0)


# -- c. the hooks of async runs do not run on the event loop -------------------------------------------------------
def test_hooks_of_async_runs_run_off_the_loop_and_before_the_outcome_is_reported(setup_factory: Any) -> None:
    """A hook of one async run that waits for another coroutine must not stall it: the hooks promise that a slow
    hook delays only its own message. And the outcome goes back only once its after-hooks are done."""
    threads: dict[str, set[str]] = {}
    other_ran = threading.Event()
    waited: list[bool] = []
    order: list[str] = []
    box: list[Setup] = []

    class Slow(hooks.Hook):
        def _note(self, what: str) -> None:
            threads.setdefault(what, set()).add(threading.current_thread().name)

        def before_task(self, run: hooks.TaskRun) -> None:
            self._note("before")

        def after_run(self, task: str, outcome: str, seconds: float) -> None:
            self._note("run")

        def after_success(self, run: hooks.TaskRun) -> None:
            self._note("success")
            if run.args[0] == "first":
                box[0].aio.put(delivery("rt_count", "second"))
                waited.append(other_ran.wait(3.0))  # on the loop, this would wait for itself
                order.append("hook of first done")

    s = setup_factory([Slow()])
    box.append(s)
    s.on_report.append(lambda d: order.append(f"reported {d.task}:{d.tag}"))
    s.on_report.append(lambda d: other_ran.set() if d.tag != first.tag else None)
    first = delivery("rt_count", "first")
    s.pool.start()
    s.aio.start()
    s.aio.put(first)
    outs = s.outcomes(2)
    assert {d.outcome for d in outs} == {Outcome.ACK}
    assert waited == [True], "the second coroutine could not run while the first one's hook ran"
    assert order.index("hook of first done") < order.index(f"reported rt_count:{first.tag}")
    for what in ("before", "run", "success"):
        assert "magne-asyncio" not in threads[what], f"{what} hook ran on the event loop"


def test_async_runs_without_hooks_start_no_hook_threads(setup_factory: Any) -> None:
    before = {t for t in threading.enumerate() if "hook" in t.name}  # other tests' may still be ending
    s = setup_factory([])
    s.pool.start()
    s.aio.start()
    for i in range(5):
        s.aio.put(delivery("rt_count", f"n{i}"))
    assert {d.outcome for d in s.outcomes(5)} == {Outcome.ACK}
    assert s.aio.hook_threads is None
    assert not [t for t in threading.enumerate() if "hook" in t.name and t not in before]


def test_a_cold_stop_cancels_an_async_run_whose_before_hook_is_slow(setup_factory: Any) -> None:
    """A cold stop landing while a before_task hook still runs off the loop: the body never starts, the message
    goes back to the broker, exactly one outcome."""
    gate = threading.Event()

    class Held(hooks.Hook):
        def before_task(self, run: hooks.TaskRun) -> None:
            gate.wait(3.0)

    s = setup_factory([Held()])
    s.pool.start()
    s.aio.start()
    s.aio.put(delivery("rt_count", "held"))
    deadline = time.monotonic() + 5
    while s.aio.busy() < 1 and time.monotonic() < deadline:
        time.sleep(0.01)
    s.aio.interrupt_all()
    gate.set()
    [d] = s.outcomes(1)
    assert d.outcome in (Outcome.GIVE_BACK, Outcome.REQUEUE)
    assert "held" not in bodies
    s.stop.set()
    s.aio.stop()
    s.aio.join(2.0)
    assert s.reported.empty()


def test_sync_mode_async_task_with_hooks_still_runs(setup_factory: Any) -> None:
    rec = Recorder()
    pool = Pool(1, TASKS, SimpleQueue(), lambda d: None, hooks=HookSet([rec]))
    out = pool.run_one(delivery("rt_count", "inline"))
    assert out.outcome is Outcome.ACK and bodies["inline"] == 1
    assert ("success", "rt_count") in rec.seen
    asyncio.run(asyncio.sleep(0))


def test_hooks_of_an_async_run_share_its_context_with_the_coroutine(setup_factory: Any) -> None:
    """What before_task sets in the context (a tracing span made current: magne.tracing) the coroutine sees, and the
    after-hook can reset it with its token, although the hooks run on a hook thread."""
    var: contextvars.ContextVar[str] = contextvars.ContextVar("rt_span", default="none")
    seen: list[str] = []
    reset: list[str] = []

    async def rt_read(label: str) -> None:
        seen.append(f"{label}:{var.get()}")

    class Span(hooks.Hook):
        def before_task(self, run: hooks.TaskRun) -> None:
            run.state[self] = var.set(f"span-{run.args[0]}")

        def after_success(self, run: hooks.TaskRun) -> None:
            try:
                var.reset(run.state.pop(self))
                reset.append("ok")
            except ValueError as exc:  # "created in a different Context"
                reset.append(str(exc))

    TASKS["rt_read"] = Task(rt_read, "rt_read", "RT")
    try:
        s = setup_factory([Span()])
        s.pool.start()
        s.aio.start()
        for label in ("a", "b"):
            s.aio.put(delivery("rt_read", label))
        assert {d.outcome for d in s.outcomes(2)} == {Outcome.ACK}
    finally:
        del TASKS["rt_read"]
    assert sorted(seen) == ["a:span-a", "b:span-b"]
    assert reset == ["ok", "ok"]


def test_a_cold_stop_gives_back_runs_the_loop_took_but_never_started(setup_factory: Any) -> None:
    """A cold stop while a coroutine holds the loop: the runs behind it that had not begun go back unstarted (their
    bodies never run), the one holding the loop is requeued."""
    s = setup_factory([], lost_after=5.0)
    s.pool.start()
    s.aio.put(delivery("rt_block", "blocker", 1.0))
    for i in range(2):
        s.aio.put(delivery("rt_count", f"cold{i}"))
    s.aio.start()
    deadline = time.monotonic() + 5
    while s.aio.guard.clock is None and time.monotonic() < deadline:
        time.sleep(0.01)
    s.aio.interrupt_all()
    outs = s.outcomes(3)
    assert sorted((d.task, d.outcome.name) for d in outs) == [
        ("rt_block", "REQUEUE"), ("rt_count", "GIVE_BACK"), ("rt_count", "GIVE_BACK")]
    assert not [k for k in bodies if k.startswith("cold")]


def test_an_async_run_with_wrong_arguments_is_dead_lettered_once(setup_factory: Any) -> None:
    """Binding the arguments is the run's first step: a TypeError there is the run's failure, not a run that never
    began (which would go back to the broker, and come back, forever)."""
    rec = Recorder()
    s = setup_factory([rec])
    s.pool.start()
    s.aio.start()
    s.aio.put(delivery("rt_count", "a", "b", "c"))
    [d] = s.outcomes(1)
    assert d.outcome is Outcome.DEAD and d.reason == "wrong arguments"
    assert ("run", "rt_count:dead") in rec.seen and ("failure", "rt_count:dead") in rec.seen
    s.aio.stop()
    s.aio.join(2.0)
    assert s.reported.empty()
