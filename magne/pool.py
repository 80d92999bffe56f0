"""The worker pool: N threads that run tasks and hand outcomes back to the I/O thread.

Each thread takes a delivery from the work queue and runs it by the task-run protocol
(magne.runner: resolve, hooks, the task under its time limit, the decision); the delivery
then goes back to the I/O thread through `report`. Whatever the task raises, including
SystemExit and KeyboardInterrupt, is that task's failure: it never ends the thread.
The watchdog (`check`, called by the worker's main thread) fires time limits,
abandons threads that do not come back within `lost_after` (blocked in C or a
system call: their message is decided for them), and replaces a thread that died.

Lifecycle hooks (magne.hooks: users', --metrics' TaskMetrics, tracing) run around
the task on its own thread, through `Runner.run_hooked`; with no hook registered each
thread runs `Runner.run`, the path as it was, so hooks cost nothing unless used.
"""

from __future__ import annotations

import itertools
import threading
import time
from collections.abc import Callable
from queue import SimpleQueue
from typing import Any

from magne import logs
from magne.amqp.protocol import DEFAULT_FRAME_MAX
from magne.cancels import is_cancelled
from magne.delivery import Delivery
from magne.errors import ColdShutdown, TimeLimitExceeded
from magne.hooks import HookSet
from magne.policy import Failure, RetryPolicy
from magne.registry import Task
from magne.runner import Runner
from magne.timelimits import Slot, SlotState

log = logs.Log("magne.pool")


class Pool:
    """The worker's pool threads and their watchdog. Built and driven by the worker's main thread (start, check,
    interrupt_all, stop, join); each thread runs deliveries from `work` by the task-run protocol (`runner`)."""

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
        self.work = work
        # The task-run protocol (magne.runner), shared with the event loop of `async def` tasks (magne.asyncpool).
        self.runner = Runner(tasks, report, time_limit, lost_after, retry, queue_types, frame_max, hooks)
        self.tasks, self.report, self.hooks = tasks, report, self.runner.hooks
        self.time_limit, self.lost_after = time_limit, lost_after
        self.slots: list[Slot] = []
        self.lost = 0
        self.replaced = 0
        self.stopping = False  # stop() was called: threads end on purpose
        self.time_limits: dict[str, int] = {}  # task -> time-limit interrupts fired (main thread writes, scrapes read)
        self._names = itertools.count(1)
        self._aio: Any = None

    @property
    def aio(self) -> Any:
        """The event loop of `async def` tasks (magne.asyncpool.AsyncPool), set by the worker when a task is one: a
        pool thread that decodes an async task (a queue shared by both kinds) hands it over there (its `put`).
        Without one (magne.testing) the thread runs it to the end itself (Task.blocking)."""
        return self._aio

    @aio.setter
    def aio(self, aio: Any) -> None:
        self._aio = aio
        self.runner.to_loop = aio.put if aio is not None else None

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
        """Let every thread finish its current task, then exit (main thread). From here on a thread that ended is not
        replaced: it ended because it was told to."""
        self.stopping = True
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
        """Fire due time limits, abandon threads that did not come back, replace dead threads. The decisions are
        made under each slot's guard lock (magne.timelimits): a slot is the clock of every run its thread makes."""
        lost_after = self.lost_after
        for i, s in enumerate(self.slots):
            if s.thread is not None and not s.thread.is_alive() and not s.abandoned:
                if not self.stopping:
                    self.slots[i] = self._replace_dead(s)
                continue
            if s.clock is None:  # idle (a racy read; the guard checks again under its lock)
                continue
            if s.interrupt(s, TimeLimitExceeded, now, due=True):
                d = s.delivery
                task = logs.clean(d.task, 100) if d else "?"
                log.warning("task %s (message %s) passed its time limit; interrupting its thread %s",
                            task, d.message_id() if d else "?", s.thread.name if s.thread else "?",
                            event="time_limit", task=task)
                key = d.task if d is not None and d.task in self.tasks else "unknown"
                self.time_limits[key] = self.time_limits.get(key, 0) + 1
            elif s.interrupted_at and s.abandon(s, now, in_step_since_interrupt=lost_after):  # racy pre-check
                self.slots[i] = self._abandon(s)

    def cancel_running(self, ids: set[str], now: float) -> None:
        """Main thread (magne.control, every tick while a cancel is fresh): raise Cancelled in the threads running
        one of these message ids. Its message is acked as cancelled (Runner.failed), or by the watchdog if the
        thread does not come back (Runner.abandoned), like a time limit."""
        for s in self.slots:
            d = s.delivery
            if d is None or s.clock is None or s.interrupted or not is_cancelled(d, ids):
                continue
            if s.cancel(d, now):
                log.info("message %s (task %s) was cancelled while running; interrupting its thread %s",
                         d.message_id(), logs.clean(d.task, 100), s.thread.name if s.thread else "?",
                         event="cancel_running", task=d.task)

    def interrupt_all(self) -> None:
        """Cold shutdown (main thread): interrupt every running task; its message is requeued."""
        now = time.monotonic()
        for s in self.slots:
            s.interrupt(s, ColdShutdown, now)

    def _abandon(self, s: Slot) -> Slot:
        """Give up on a thread that did not come back (its slot just marked abandoned); return its replacement."""
        self.lost += 1
        d = s.delivery
        assert d is not None
        out = self.runner.abandoned(d, s.why, f"thread did not stop within {self.lost_after:g}s of the time-limit "
                                              "interrupt; abandoned")
        log.error("thread %s did not stop for task %s (message %s) %.0fs after the interrupt: "
                  "abandoning it, its message is %s, starting a replacement thread",
                  s.thread.name if s.thread else "?", out.task, out.message_id(), self.lost_after, out.outcome.name.lower(),
                  event="thread_lost", task=out.task)
        self.report(out)
        return self._spawn(s.index)

    def _replace_dead(self, s: Slot) -> Slot:
        """A pool thread ended without being told to (it should never happen): decide its message, replace it."""
        self.replaced += 1
        d = s.delivery if s.clock is not None else None
        if d is not None:
            out = d.copy()
            self.runner.fail(out, Failure("task raised", RuntimeError("the worker thread running this task died")))
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
        runner = self.runner
        run = runner.run_hooked if self.hooks else runner.run  # chosen once: no hooks, no cost per message
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
            except BaseException as exc:  # noqa: B036 - the runner contains task failures; this is magne's own bug
                log.error("handling message %s failed in magne (%s); dead-lettering it", d.message_id(),
                          type(exc).__name__, event="internal_error")
                runner.fail(d, Failure("internal error", exc, retryable=False))
            # The runner leaves the step itself; this catches the one path where an interrupt landed between the
            # task's return and that leave(). An abandoned run's message was decided by the watchdog already.
            if (slot.clock is not None and not slot.leave()) or slot.abandoned:
                log.warning("abandoned thread %s came back from task %s (message %s); its result is discarded",
                            threading.current_thread().name, d.task, d.message_id(), event="abandoned_returned",
                            task=d.task)
                return
            d.started = slot.started if slot.delivery is d else 0.0  # for magne.events: a store, no clock read
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
            (self.runner.run_hooked if self.hooks else self.runner.run)(slot, d)
        except BaseException as exc:  # noqa: B036 - as in _loop: the runner contains task failures; this is magne's bug
            self.runner.fail(d, Failure("internal error", exc, retryable=False))
        return d
