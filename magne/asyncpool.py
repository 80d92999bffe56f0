"""The event loop for `async def` tasks: one asyncio loop per worker process, in its own thread, beside the pool.

Why a loop of our own: half of new services are asyncio (httpx, asyncpg, aiohttp). Running each coroutine with
asyncio.run on a pool thread would cost a thread per task in flight; one loop runs thousands at once. It sits
beside the pool on the same connection and I/O thread: deliveries of queues whose tasks are all `async def` come
straight from the I/O thread (`put`), async tasks found on a queue shared with thread tasks are handed over by the
pool thread that decoded them, and every outcome goes back through the same task-run protocol and `report` as the
pool's (magne.runner), so acks, retries and dead letters take the one coalesced path (magne/io/settle.py).

Threads: `magne-asyncio` runs the loop and every coroutine (magne.loopthread); `magne-hooks-N` run the lifecycle
hooks of async runs, only when a hook is registered (magne.asyncrun); the I/O thread calls `put` and
`take_unstarted`; pool threads call `put`; the worker's main thread calls `check` (the watchdog), `interrupt_all`
and `stop`.

Concurrency: at most `concurrency` runs hold a place (from their start to their report, hooks included); the rest
wait in `inbox`, which a warm stop or a reconnect empties (`take_unstarted`: they go back to the broker unstarted).

Time limits (the same guarantees as thread tasks, magne/pool.py, by the same Guard, magne.timelimits):
- a run's clock starts at its first step. A run the loop took while another coroutine held it has used none of its
  time: it is never cancelled, interrupted nor abandoned before it began, and it starts when the loop turns (or
  goes back to the broker unstarted at a cold stop). An abandoned run never starts;
- at its deadline the loop cancels the run's asyncio Task; the coroutine sees CancelledError and its message fails
  with TimeLimitExceeded (retried or dead-lettered by the task's policy);
- the coroutine may ignore the cancel, or block the loop with sync code (so the loop cannot even cancel it).
  `lost_after` past the deadline, a run that is inside a step gets TimeLimitExceeded raised in the loop thread,
  exactly as a thread task does; a run that is not (it swallowed the cancel and awaits on) is abandoned: its
  message is decided without it and its place freed, and whatever it does later is discarded (no hook sees it).
"""

from __future__ import annotations

import asyncio
import functools
import time
from collections import deque
from collections.abc import Callable
from typing import Any

from magne import logs
from magne.asyncrun import HookThreads, Run, Stepped
from magne.cancels import is_cancelled
from magne.chords import on_success
from magne.delivery import Delivery, Outcome
from magne.errors import Cancelled, ColdShutdown, ConfigError, Interrupt, TimeLimitExceeded
from magne.loopthread import LoopThread
from magne.runner import Resolved, Runner
from magne.workflow import asks

log = logs.Log("magne.asyncpool")


class AsyncPool(LoopThread):
    def __init__(self, runner: Runner, to_threads: Callable[[Delivery], None], concurrency: int,
                 loop_kind: str = "asyncio") -> None:
        """`runner`: the task-run protocol shared with the pool; `to_threads`: where a thread task's message found
        on an async queue goes (the pool's work queue's `put`)."""
        if concurrency < 1:
            raise ConfigError("--async-concurrency must be at least 1")
        super().__init__(loop_kind)
        self.runner = runner
        self.to_threads = to_threads
        self.concurrency = concurrency
        self.inbox: deque[tuple[Delivery, Resolved | None]] = deque()
        self.running: dict[int, Run] = {}  # id(run) -> run; the loop thread adds and removes, the watchdog reads
        self.hook_threads = HookThreads(runner.hooks) if runner.hooks else None  # none without hooks: no cost
        self.abandoned = 0
        self.time_limits: dict[str, int] = {}  # task -> cancels at its time limit (the loop thread writes, scrapes read)
        self._pending = False
        self._cold = False  # a cold stop began: start nothing more (what waits goes back to the broker unstarted)

    def busy(self) -> int:
        return sum(1 for r in list(self.running.values()) if not r.abandoned)

    def status(self) -> str:
        return (f"async running={self.busy()} waiting={len(self.inbox)} of {self.concurrency} "
                f"loop_stalls={self.stalls} abandoned={self.abandoned}")

    def stop(self) -> None:
        super().stop()
        if self.hook_threads is not None:
            self.hook_threads.stop()

    def _on_start(self, loop: asyncio.AbstractEventLoop) -> None:
        loop.call_soon(self._start_more)  # whatever the I/O thread put in the inbox before the loop existed

    def _on_wind_down(self) -> None:
        for run in list(self.running.values()):
            run.why = ColdShutdown  # cut by the stop: its message goes back to the queue, it did not fail

    # -- taking deliveries (I/O thread, pool threads) ------------------------------------------------
    def put(self, d: Delivery, resolved: Resolved | None = None) -> None:
        """I/O thread (a delivery of an async-only queue) or a pool thread (an async task it decoded, with its
        task and arguments): queue it for the loop; one wake-up per batch, as IOThread.report does."""
        self.inbox.append((d, resolved))
        if not self._pending:
            self._pending = True
            loop = self.loop
            if loop is None:  # the I/O thread consumes before the loop starts: its first turn takes the inbox
                return
            try:
                loop.call_soon_threadsafe(self._start_more)
            except RuntimeError:  # the loop is closed: the worker is stopping, the message goes back unstarted
                self._pending = False

    def take_unstarted(self, gen: int) -> list[Delivery]:
        """I/O thread (a warm stop, or a reconnect): take back what has not started; only the given connection
        generation's deliveries are returned (older ones' tags are gone; they are dropped)."""
        taken: list[Delivery] = []
        while True:
            try:
                d, _ = self.inbox.popleft()
            except IndexError:
                return taken
            if d.gen == gen:
                taken.append(d)

    # -- the loop thread ------------------------------------------------------------------------------
    def _start_more(self) -> None:
        """Loop thread: start waiting messages while there is room; nothing after a cold stop began."""
        self._pending = False
        loop = self.loop
        assert loop is not None
        inbox, running = self.inbox, self.running
        while len(running) < self.concurrency and not self._cold:
            try:
                d, resolved = inbox.popleft()
            except IndexError:
                return
            run = self._begin(d, resolved)
            if run is None:
                continue
            running[id(run)] = run
            # A fresh context per run (Run.ctx): else each would start with what the run that finished before it had
            # set (this is called at the end of a run, inside its context).
            run.atask = loop.create_task(self._execute(run), context=run.ctx)
            run.atask.add_done_callback(functools.partial(self._never_began, run))

    def _begin(self, d: Delivery, resolved: Resolved | None) -> Run | None:
        """A Run for a delivery (one that names no task too: it runs only its failure path), or None if it belongs
        to the pool."""
        runner = self.runner
        if resolved is None:
            try:
                resolved = runner.resolve(d)
            except BaseException as exc:  # noqa: B036 - a bad message (or magne's bug): its failure, decided in _execute
                return Run(d, None, [], {}, 0.0, exc)
        t, args, kwargs = resolved
        if not t.is_async:  # a thread task's message on an async task's queue: the pool runs it (decoding again)
            self.to_threads(d)
            return None
        return Run(d, t, args, kwargs, t.time_limit or runner.time_limit)

    def _expire(self, run: Run) -> None:
        """Loop thread, at the run's deadline (its clock started at its first step): cancel it (CancelledError)."""
        if run.atask is not None and not run.atask.done() and run.why is None and run.task is not None:
            task = logs.clean(run.d.task, 100)
            log.warning("task %s (message %s) passed its time limit; cancelling its coroutine", task,
                        run.d.message_id(), event="time_limit", task=task)
            self.time_limits[run.task.name] = self.time_limits.get(run.task.name, 0) + 1
            run.why = TimeLimitExceeded
            run.atask.cancel()

    def _never_began(self, run: Run, _atask: asyncio.Task[None]) -> None:
        """Loop thread, when a run's asyncio Task is done: one cancelled before its first step (a cold stop as the
        loop winds down) never ran _execute, so its message is given back here."""
        if run.begun:
            return
        run.atask = None
        self.running.pop(id(run), None)
        if not self.guard.finish(run):
            return
        run.d.outcome = Outcome.GIVE_BACK  # it never started: it does not count as a delivery attempt
        self.runner.report(run.d)

    async def _execute(self, run: Run) -> None:
        """Loop thread: the task-run protocol (magne.runner) for one async run; its hooks on the hook threads."""
        run.begun = True
        runner, d, t, hooked = self.runner, run.d, run.task, self.hook_threads
        args, kwargs = run.args, run.kwargs
        info = None
        exc: BaseException | None = run.error
        value: Any = None
        unstarted = False  # a cold stop came first (while it waited for the loop or for before_task): no body
        try:
            if t is not None and exc is None:
                if hooked is not None and runner.hooks.full:
                    info = await hooked.call(run, lambda _timers: runner.before(t, d, args, kwargs))
                unstarted = run.why is not None or run.abandoned
                if not unstarted:
                    loop = self.loop
                    assert loop is not None
                    run.timer = loop.call_later(run.limit, self._expire, run)  # its first step is next: its clock
                    value = await Stepped(t.fn, args, kwargs, run, self.guard)
        except BaseException as e:  # noqa: B036 - whatever the coroutine raised is its task's failure
            exc = e
        finally:
            if run.timer is not None:
                run.timer.cancel()
            if self.guard.clock is run:  # an interrupt landed between the step and its leave(): clear it now
                self.guard.leave()
        started = run.started
        seconds = time.monotonic() - started if started else 0.0
        if not self.guard.finish(run):
            log.warning("abandoned task %s (message %s) came back after %.1fs; its result is discarded",
                        d.task, d.message_id(), seconds, event="abandoned_returned", task=d.task)
            self._forget(run)
            return
        if unstarted and run.why is Cancelled:
            exc = Cancelled("cancelled before it started")
            runner.was_cancelled(d, exc)
        elif unstarted:  # cut by a cold stop before its first step: back unstarted
            d.outcome = Outcome.GIVE_BACK
            exc = ColdShutdown("the worker stopped before the task started")
        elif exc is not None:
            if isinstance(exc, asyncio.CancelledError | Interrupt) and run.why is not None:
                exc = run.why(*exc.args)  # our cancel or interrupt: a time limit, or a cold stop
            runner.failed(d, t, args, kwargs, exc)
        elif t is not None and asks(d.header):  # its result, next step, chord (blocking: on an executor thread)
            try:
                await asyncio.get_running_loop().run_in_executor(None, on_success, d, t.name, value)
            except asyncio.CancelledError:  # a cold stop meanwhile: its follow-ups may be half made; it runs again
                d.outcome, d.follow = Outcome.REQUEUE, None
        if hooked is not None:  # the outcome is reported after the after-hooks, as on a pool thread
            if exc is None:
                await hooked.call(run, lambda timers: runner.after_success(d, info, started, seconds, timers))
            else:
                failure = exc
                await hooked.call(run, lambda timers: runner.after_failure(d, t, args, kwargs, failure, info, started,
                                                                           seconds, timers))
        d.started = started
        runner.report(d)
        self._forget(run)

    def _forget(self, run: Run) -> None:
        """Loop thread: free a run's place (it reported, or the watchdog abandoned it) and start what waits."""
        run.atask = None  # no cycle between the run and its Task's coroutine frame
        self.running.pop(id(run), None)
        self._start_more()

    def _cancel(self, run: Run) -> None:
        """Loop thread, at a cold stop: cancel a run's Task, unless it waits for a hook (see HookThreads.call: it
        sees `run.why` once the hook returned, and then starts no body)."""
        if run.atask is not None and not run.in_hook:
            run.atask.cancel()

    def _cancellable(self, atask: asyncio.Task[None]) -> bool:
        """Loop thread, winding down: whether to cancel a Task left on the loop (not one waiting for a hook)."""
        return not any(run.in_hook and run.atask is atask for run in self.running.values())

    # -- the watchdog (main thread) -----------------------------------------------------------------------
    def check(self, now: float) -> None:
        """Called by the worker's main thread every tick: report a held loop, interrupt or abandon overdue runs.
        A run that has not begun has no deadline yet (its clock starts at its first step): it is never touched."""
        self.check_lag(now)
        lost_after = self.runner.lost_after
        guard = self.guard
        for run in list(self.running.values()):
            over = now - run.deadline
            if over < lost_after or run.finished:
                continue
            # A run holding the loop gets TimeLimitExceeded raised in its step, and again every second while it still
            # holds it (an interrupt can be swallowed where it lands: a garbage-collector callback during the step
            # reports and drops it), abandoned or not: the loop must come back for the others.
            again = bool(run.interrupted_at)
            if guard.clock is run and (not again or now - run.interrupted_at >= 1.0):
                if guard.interrupt(run, run.why or TimeLimitExceeded, now, again=again):
                    if not again:
                        log.error("task %s (message %s) is %.0fs past its time limit and holds the event loop; "
                                  "raising TimeLimitExceeded in it", run.d.task, run.d.message_id(), over,
                                  event="time_limit", task=run.d.task)
                    continue
            if not run.abandoned and (not run.interrupted_at or over >= 2 * lost_after):
                self._abandon(run, over)

    def _abandon(self, run: Run, over: float) -> None:
        """Main thread: decide the message of a run that did not end after its cancel (or interrupt)."""
        if not self.guard.abandon(run):
            return
        self.abandoned += 1
        d = run.d
        limit = run.limit
        out = self.runner.abandoned(d, run.why, f"task ran past its time limit of {limit:g}s and did not stop within "
                                                f"{self.runner.lost_after:g}s of being cancelled; abandoned")
        log.error("task %s (message %s) did not stop %.0fs after its time limit: abandoning its coroutine, its "
                  "message is %s, its place goes to the next task", d.task, d.message_id(), over,
                  out.outcome.name.lower(), event="task_abandoned", task=d.task)
        self.runner.report(out)
        loop = self.loop
        if loop is not None:
            try:
                loop.call_soon_threadsafe(self._forget, run)
            except RuntimeError:
                pass

    def cancel_running(self, ids: set[str], now: float) -> None:
        """Main thread (magne.control): cancel the coroutines running these message ids (asyncio cancellation; the
        run ends as Cancelled, acked, not retried). One that ignores the cancel is left to its time limit."""
        loop = self.loop
        for run in list(self.running.values()):
            if run.why is None and not run.finished and is_cancelled(run.d, ids) and loop is not None:
                run.why = Cancelled
                log.info("message %s (task %s) was cancelled while running; cancelling its coroutine",
                         run.d.message_id(), logs.clean(run.d.task, 100), event="cancel_running", task=run.d.task)
                try:
                    loop.call_soon_threadsafe(self._cancel_unfinished, run)
                except RuntimeError:
                    pass

    def _cancel_unfinished(self, run: Run) -> None:
        """Loop thread, for magne.cancel: `_cancel`, unless the run finished since the watchdog looked (its outcome is
        decided: a CancelledError now would land in its follow-ups, results or next step, and requeue it)."""
        if not run.finished:
            self._cancel(run)

    def interrupt_all(self) -> None:
        """Cold shutdown (main thread): start nothing more, cancel every running coroutine; their messages are
        requeued (given back, for those that had not started)."""
        self._cold = True
        loop = self.loop
        now = time.monotonic()
        for run in list(self.running.values()):
            run.why = ColdShutdown
            if loop is not None:
                try:
                    loop.call_soon_threadsafe(self._cancel, run)
                except RuntimeError:
                    pass
            self.guard.interrupt(run, ColdShutdown, now)
