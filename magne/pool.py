"""The worker pool: N threads that run tasks and hand outcomes back to the I/O thread.

Each thread takes a delivery from the work queue, decodes it (magne.wire), finds
the registered task, runs it under its time limit (magne.timelimits), and on a
failure asks the policy (magne.policy.decide) what to do; the delivery then goes
back to the I/O thread through `report`. Whatever the task raises, including
SystemExit and KeyboardInterrupt, is that task's failure: it never ends the thread.
The watchdog (`check`, called by the worker's main thread) fires time limits,
abandons threads that do not come back within `lost_after` (blocked in C or a
system call: their message is decided for them), and replaces a thread that died.

Lifecycle hooks (magne.hooks: users', --metrics' TaskMetrics, tracing) run around
the task on its own thread, through `_run_hooked`; with no hook registered each
thread runs `_run`, the path as it was, so hooks cost nothing unless used.
"""

from __future__ import annotations

import dataclasses
import inspect
import itertools
import threading
import time
from collections.abc import Callable
from queue import SimpleQueue
from typing import TYPE_CHECKING, Any

from magne import logs, wire
from magne.amqp.protocol import DEFAULT_FRAME_MAX
from magne.delivery import Delivery, Outcome
from magne.errors import BadMessage, ColdShutdown, Interrupt, TimeLimitExceeded
from magne.hooks import _DECISIONS, HookSet, TaskRun, registered
from magne.hooks import _report as report_hook_failure
from magne.policy import Failure, RetryPolicy, dead_letter_plainly, decide
from magne.registry import Task
from magne.timelimits import Slot, SlotState

if TYPE_CHECKING:
    from magne.asyncpool import AsyncPool

log = logs.Log("magne.pool")


class Pool:
    def __init__(
        self,
        size: int,
        tasks: dict[str, Task],
        work: SimpleQueue[Delivery | None],
        report: Callable[[Delivery], None],
        time_limit: float = 600.0,
        lost_after: float = 10.0,
        retry: RetryPolicy | None = None,
        queue_types: dict[str, str] | None = None,
        frame_max: int = DEFAULT_FRAME_MAX,
        hooks: HookSet | None = None,
    ) -> None:
        self.size = size
        self.tasks = tasks
        default = retry or RetryPolicy()
        # Each task's policy: its own settings over the worker's defaults, merged once here.
        self.policies = {name: dataclasses.replace(default, **t.retry_options) for name, t in tasks.items()}
        self.work = work
        self.report = report
        self.time_limit = time_limit
        self.lost_after = lost_after
        self.queue_types = queue_types or {}
        self.frame_max = frame_max
        self.slots: list[Slot] = []
        self.lost = 0
        self.replaced = 0
        self.time_limits: dict[str, int] = {}  # task -> time-limit interrupts fired (main thread writes, scrapes read)
        # The lifecycle hooks (magne.hooks): those registered when the pool is made, unless given.
        self.hooks = hooks if hooks is not None else HookSet(registered())
        self._names = itertools.count(1)
        # The event loop of `async def` tasks (magne.asyncpool), set by the worker when a task is one: a pool thread
        # that decodes an async task (a queue shared by both kinds) hands it over there. Without one (magne.testing)
        # the thread runs it to the end itself (Task.blocking).
        self.aio: AsyncPool | None = None

    # -- lifecycle (main thread) ---------------------------------------------
    def start(self) -> None:
        for i in range(self.size):
            self.slots.append(self._spawn(i))

    def _spawn(self, index: int) -> Slot:
        slot = Slot(index)
        t = threading.Thread(target=self._thread_main, args=(slot,), name=f"worker-{next(self._names)}", daemon=True)
        slot.thread = t
        t.start()
        return slot

    def stop(self) -> None:
        """Let every thread finish its current task, then exit."""
        for _ in self.slots:
            self.work.put(None)

    def join(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        for s in self.slots:
            if s.thread is not None and s.state is not SlotState.LOST:
                s.thread.join(max(0.0, deadline - time.monotonic()))

    def busy(self) -> int:
        return sum(1 for s in self.slots if s.state is SlotState.RUNNING)

    def alive(self) -> int:
        return sum(1 for s in self.slots if s.thread is not None and s.thread.is_alive())

    def status(self) -> str:
        return f"threads live={self.alive()} busy={self.busy()} lost={self.lost} replaced={self.replaced}"

    # -- the watchdog (main thread, every tick) -------------------------------------
    def check(self, now: float) -> None:
        """Fire due time limits, abandon threads that did not come back, replace dead threads."""
        for i, s in enumerate(self.slots):
            if s.thread is not None and not s.thread.is_alive() and s.state is not SlotState.LOST:
                self.slots[i] = self._replace_dead(s)
                continue
            if s.state is not SlotState.RUNNING:
                continue
            with s.lock:
                if s.state is not SlotState.RUNNING:
                    continue
                if s.interrupted is None:
                    if now >= s.deadline:
                        d = s.delivery
                        task = logs.clean(d.task, 100) if d else "?"
                        log.warning("task %s (message %s) passed its time limit; interrupting its thread %s",
                                    task, d.message_id() if d else "?", s.thread.name if s.thread else "?",
                                    event="time_limit", task=task)
                        s.interrupt(TimeLimitExceeded, now)
                        key = d.task if d is not None and d.task in self.tasks else "unknown"
                        self.time_limits[key] = self.time_limits.get(key, 0) + 1
                elif now - s.interrupted_at >= self.lost_after:
                    self.slots[i] = self._abandon(s)

    def interrupt_all(self) -> None:
        """Cold shutdown (main thread): interrupt every running task; its message is requeued."""
        now = time.monotonic()
        for s in self.slots:
            with s.lock:
                s.interrupt(ColdShutdown, now)

    def _abandon(self, s: Slot) -> Slot:
        """Under s.lock: give up on a thread that did not come back; return its replacement."""
        s.state = SlotState.LOST
        self.lost += 1
        d = s.delivery
        assert d is not None
        out = d.copy()  # the old thread may still write to `d`; the I/O thread gets its own copy
        if s.interrupted is ColdShutdown:
            out.outcome = Outcome.REQUEUE
        else:
            self._fail(out, Failure("time limit", TimeLimitExceeded(
                f"thread did not stop within {self.lost_after:g}s of the time-limit interrupt; abandoned")))
        log.error("thread %s did not stop for task %s (message %s) %.0fs after the interrupt: "
                  "abandoning it, its message is %s, starting a replacement thread",
                  s.thread.name if s.thread else "?", out.task, out.message_id(), self.lost_after, out.outcome.name.lower(),
                  event="thread_lost", task=out.task)
        self.report(out)
        return self._spawn(s.index)

    def _replace_dead(self, s: Slot) -> Slot:
        """A pool thread ended without being told to (it should never happen): decide its message, replace it."""
        self.replaced += 1
        d = s.delivery if s.state is SlotState.RUNNING else None
        if d is not None:
            out = d.copy()
            self._fail(out, Failure("task raised", RuntimeError("the worker thread running this task died")))
            self.report(out)
        log.error("worker thread %s died%s; starting a replacement", s.thread.name if s.thread else "?",
                  f" running task {d.task}" if d else "", event="thread_died")
        return self._spawn(s.index)

    # -- the worker threads ----------------------------------------------------
    def _thread_main(self, slot: Slot) -> None:
        slot.ident = threading.get_ident()
        while True:
            try:
                self._loop(slot)
                return
            except BaseException as exc:  # noqa: B036 - nothing may end a pool thread
                # _run contains every task failure and leave() clears late interrupts, so this
                # is a raise from outside the protocol; keep the thread rather than shrink the pool.
                log.warning("thread %s caught a stray interrupt (%s) between tasks; continuing",
                            threading.current_thread().name, type(exc).__name__)
                logs.release_leaked_locks()

    def _loop(self, slot: Slot) -> None:
        get = self.work.get
        run = self._run_hooked if self.hooks else self._run  # chosen once: no hooks, no cost per message
        if self.hooks:
            slot.timers = self.hooks.thread_timers()  # per-thread after_run callables, bound once on this thread
        report = self.report
        while True:
            d = get()
            if d is None:
                return
            try:
                if run(slot, d):
                    continue  # an async task, handed to the event loop: it reports the outcome
            except BaseException as exc:  # noqa: B036 - _run contains task failures; this is magne's own bug
                log.error("handling message %s failed in magne (%s); dead-lettering it", d.message_id(),
                          type(exc).__name__, event="internal_error")
                self._fail(d, Failure("internal error", exc, retryable=False))
            # _run leaves RUNNING itself; this catches the one path where an interrupt
            # landed between the task's return and that step.
            if slot.state is not SlotState.IDLE and not slot.leave():
                log.warning("abandoned thread %s came back from task %s (message %s); its result is discarded",
                            threading.current_thread().name, d.task, d.message_id())
                return
            slot.delivery = None
            report(d)

    def run_one(self, d: Delivery) -> Delivery:
        """Run one delivery on the calling thread, by the pool threads' own path; return it with its outcome.

        For magne.testing's synchronous mode. No watchdog watches the caller, so no time limit fires.
        """
        slot = Slot(-1)
        slot.ident = threading.get_ident()
        slot.timers = self.hooks.run  # the hooks' own methods: binding per call would make state per call
        try:
            (self._run_hooked if self.hooks else self._run)(slot, d)
        except BaseException as exc:  # noqa: B036 - as in _loop: _run contains task failures; this is magne's bug
            self._fail(d, Failure("internal error", exc, retryable=False))
        return d

    def _resolve(self, d: Delivery) -> tuple[Task, list[Any], dict[str, Any]]:
        """The registered task a delivery names, with its arguments; BadMessage if there is none.

        Pool threads, and the event loop's thread (magne.asyncpool) for the queues it is fed directly."""
        wire.check_encoding(d.header)
        name, args, kwargs = wire.decode(d.body)
        d.task = name
        t = self.tasks.get(name)
        if t is None:
            raise BadMessage(f"unknown task {logs.clean(name, 100)!r}: no task of that name is registered in this worker")
        return t, args, kwargs

    def _run(self, slot: Slot, d: Delivery) -> bool:
        """Run one delivery on this pool thread; True if it was handed to the event loop instead (async task)."""
        t: Task | None = None
        args: list[Any] = []
        kwargs: dict[str, Any] = {}
        try:
            t, args, kwargs = self._resolve(d)
            if t.is_async and self.aio is not None:
                self.aio.put(d, (t, args, kwargs))
                return True
            slot.enter(d, t.time_limit or self.time_limit)
            try:
                result = t.blocking(*args, **kwargs)  # success keeps the delivery's default outcome, ACK
            finally:
                slot.leave()  # if this thread was abandoned meanwhile, _loop discards the result
            if result is not None and inspect.isawaitable(result):  # a None check on the hot path, nothing more
                _refuse_awaitable(result)
        except BaseException as exc:  # noqa: B036 - SystemExit, KeyboardInterrupt, ...: the task's failure
            self._failed(d, t, args, kwargs, exc)
        return False

    def _run_hooked(self, slot: Slot, d: Delivery) -> bool:
        """_run with the lifecycle hooks (magne.hooks) around the task; the pool runs this one instead of _run
        only when a hook is registered, so that without hooks the per-message path is untouched.

        Pool thread. before_task runs once the task is known and before slot.enter, the after-hooks once the
        outcome is decided and after slot.leave: the watchdog interrupts only a RUNNING slot, so no time limit
        lands in a hook. They run before `report`, while the delivery is still this thread's. A TaskRun is
        made only if a hook other than after_run wants one (hooks.full): after_run alone costs a clock read
        and a call.
        """
        hooks = self.hooks
        t: Task | None = None
        args: list[Any] = []
        kwargs: dict[str, Any] = {}
        run: TaskRun | None = None
        started = 0.0
        try:
            t, args, kwargs = self._resolve(d)
            if t.is_async and self.aio is not None:  # the event loop runs its hooks
                self.aio.put(d, (t, args, kwargs))
                return True
            if hooks.full:
                run = TaskRun(t, d, args, kwargs)
                if hooks.before:
                    hooks.before_task(run)
            slot.enter(d, t.time_limit or self.time_limit)
            started = slot.started
            try:
                result = t.blocking(*args, **kwargs)
            finally:
                slot.leave()
            if result is not None and inspect.isawaitable(result):
                _refuse_awaitable(result)
        except BaseException as exc:  # noqa: B036 - as in _run
            self._failed_hooked(d, t, args, kwargs, exc, run, started, slot.timers)
            return False
        seconds = time.monotonic() - started
        for fn in slot.timers:  # HookSet.after_run, inlined: the per-message path under --metrics
            try:
                fn(d.task, "success", seconds)
            except BaseException as exc:  # noqa: B036 - a hook changes no outcome
                report_hook_failure(fn, exc)
        if run is not None:
            run.started, run.duration = started, seconds
            hooks.after_success(run)
        return False

    def _failed_hooked(self, d: Delivery, t: Task | None, args: list[Any], kwargs: dict[str, Any], exc: BaseException,
                       run: TaskRun | None, started: float, timers: tuple[Any, ...]) -> None:
        """_failed, then the hooks of a failed run (cold path): after_run with its decision if the task had
        started (`started`: its clock at the start, else 0), after_failure (and on_dead_letter) with a TaskRun,
        made here if the run has none (its message named no task). Called by the thread that ran it: a pool
        thread, or for an async task the event loop's (magne.asyncpool)."""
        seconds = time.monotonic() - started if started else 0.0  # the task's own time, before deciding
        self._failed(d, t, args, kwargs, exc)
        if started:
            decision = _DECISIONS[d.outcome]
            for fn in timers:
                try:
                    fn(d.task, decision, seconds)
                except BaseException as hook_exc:  # noqa: B036 - a hook changes no outcome
                    report_hook_failure(fn, hook_exc)
        if self.hooks.full:
            if run is None:
                run = TaskRun(None, d, args, kwargs)
            run.started, run.duration, run.exception = started, seconds, exc
            self.hooks.after_failure(run)

    def _failed(self, d: Delivery, t: Task | None, args: list[Any], kwargs: dict[str, Any], exc: BaseException) -> None:
        """Whatever a run raised becomes its message's decision (pool thread or the event loop's, cold path)."""
        if isinstance(exc, BadMessage):
            self._fail(d, Failure("bad message", exc, retryable=False))
        elif isinstance(exc, TimeLimitExceeded):
            logs.release_leaked_locks()
            limit = (t.time_limit if t else None) or self.time_limit
            exc.args = (f"task ran past its time limit of {limit:g}s",)
            self._fail(d, Failure("time limit", exc))
        elif isinstance(exc, ColdShutdown):
            logs.release_leaked_locks()
            d.outcome = Outcome.REQUEUE
        elif isinstance(exc, TypeError) and t is not None and not _binds(t.fn, args, kwargs):
            self._fail(d, Failure("wrong arguments", exc, retryable=False))
        else:
            if isinstance(exc, Interrupt):
                logs.release_leaked_locks()
            self._fail(d, Failure("task raised", exc))

    def _fail(self, d: Delivery, failure: Failure) -> None:
        """Decide retry or dead letter and prepare the copy. Total: whatever a message or an exception holds,
        the delivery leaves with an outcome (cold path, pool thread)."""
        try:
            warnings = decide(d, failure, self.policies.get(d.task), self.frame_max,
                              self.queue_types.get(d.queue, "classic"))
        except Exception as exc:  # a bug in deciding must not lose the message: dead-letter it plainly
            why = f"deciding its outcome failed ({type(exc).__name__}: {wire.safe_text(exc, 300)})"
            warnings = [f"{why}; dead-lettering it with magne's headers only"]
            try:
                dead_letter_plainly(d, failure, why)
            except Exception:
                d.task = ""
                dead_letter_plainly(d, Failure(failure.reason, BadMessage("unprintable failure"), False), why)
        for w in warnings:
            task = logs.clean(d.task, 100)
            log.warning("message %s (task %s) from queue %s: %s", d.message_id(), task, d.queue, logs.clean(w, 600),
                        event="bad_header", task=task, queue=d.queue)


def _refuse_awaitable(result: Any) -> None:
    """A plain-looking task returned a coroutine (an async function magne could not recognise as one, e.g. behind a
    decorator that hides it): its body never ran, so the message must not be acked. Close it and fail the run."""
    close = getattr(result, "close", None)
    if close is not None:
        close()
    raise BadMessage(f"the task returned {type(result).__name__} instead of running: it is an async function "
                     "that @task could not recognise (a decorator hides it?); make the decorator keep "
                     "`async def` (functools.wraps on an async wrapper) or wrap it in a plain function")


def _binds(fn: Callable[..., Any], args: list[Any], kwargs: dict[str, Any]) -> bool:
    try:
        inspect.signature(fn).bind(*args, **kwargs)
    except TypeError:
        return False
    except ValueError:  # no signature available (some builtins): assume it bound
        return True
    return True
