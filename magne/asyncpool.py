"""The event loop for `async def` tasks: one asyncio loop per worker process, in its own thread, beside the pool.

Why a loop of our own: half of new services are asyncio (httpx, asyncpg, aiohttp). Running each coroutine with
asyncio.run on a pool thread would cost a thread per task in flight; one loop runs thousands at once. It sits
beside the pool on the same connection and I/O thread: deliveries of queues whose tasks are all `async def` come
straight from the I/O thread (`put`), async tasks found on a queue shared with thread tasks are handed over by the
pool thread that decoded them, and every outcome goes back through the same `report` as the pool's, so acks,
retries and dead letters take the one coalesced path (magne/io/settle.py).

Threads: `magne-asyncio` runs the loop and every coroutine; the I/O thread calls `put` and `take_unstarted`;
pool threads call `put`; the worker's main thread calls `check` (the watchdog), `interrupt_all` and `stop`.

Concurrency: at most `concurrency` coroutines run; the rest wait in `inbox`, which a warm stop or a reconnect
empties (`take_unstarted`: they go back to the broker unstarted).

Time limits (the same guarantees as thread tasks, magne/pool.py):
- at its deadline the loop cancels the run's asyncio Task (`Task.cancel()`); the coroutine sees CancelledError and
  its message fails with TimeLimitExceeded (retried or dead-lettered by the task's policy);
- the coroutine may ignore the cancel, or block the loop with sync code (so the loop cannot even cancel it). Each
  step of a run executes under `Step` (below), so the watchdog knows which run the loop is inside. `lost_after`
  past the deadline, a run that is inside a step gets TimeLimitExceeded raised in the loop thread, exactly as a
  thread task does (magne.timelimits); a run that is not (it swallowed the cancel and awaits on) is abandoned:
  its message is decided without it and its place freed, and whatever it does later is discarded;
- a loop that does not come back for LAG_WARNING is reported with the task that holds it; the I/O thread owns the
  heartbeats, so a blocked loop never costs the connection.
"""

from __future__ import annotations

import asyncio
import contextvars
import functools
import threading
import time
from collections import deque
from collections.abc import Coroutine, Generator
from typing import TYPE_CHECKING, Any

from magne import logs, wire
from magne.delivery import Delivery, Outcome
from magne.errors import ColdShutdown, ConfigError, Interrupt, TimeLimitExceeded
from magne.hooks import TaskRun
from magne.hooks import _report as report_hook_failure
from magne.policy import Failure
from magne.timelimits import raise_in

if TYPE_CHECKING:
    from magne.pool import Pool
    from magne.registry import Task

log = logs.Log("magne.asyncpool")

LAG_WARNING = 0.5  # seconds the loop may go without turning before the watchdog reports who holds it
BEAT = 0.1  # how often the loop stamps `beat`


class Run:
    """One async task run: made and driven by the loop thread, read (and maybe abandoned) by the watchdog."""

    __slots__ = ("d", "task", "args", "kwargs", "deadline", "started", "atask", "why", "cancelled", "interrupted",
                 "interrupted_at", "abandoned", "finished", "timer", "begun")

    def __init__(self, d: Delivery, task: Task, args: list[Any], kwargs: dict[str, Any], limit: float) -> None:
        self.d = d
        self.task = task
        self.args = args
        self.kwargs = kwargs
        self.started = time.monotonic()
        self.deadline = self.started + limit
        self.atask: asyncio.Task[None] | None = None
        self.why: type[Interrupt] | None = None  # set before the cancel: a time limit, or a cold stop
        self.cancelled = False
        self.interrupted = False  # the watchdog raised in the loop thread for it
        self.interrupted_at = 0.0
        self.begun = False  # its first step ran (_execute started)
        self.abandoned = False  # the watchdog decided its message without it (under AsyncPool.lock)
        self.finished = False  # its coroutine ended and its outcome is being reported (under AsyncPool.lock)
        self.timer: asyncio.TimerHandle | None = None


class Step:
    """Which run's step the loop thread is executing, shared with the watchdog under `lock`.

    The same protocol as magne.timelimits.Slot, per coroutine step instead of per task: the watchdog raises
    into the loop thread only while a given run's step holds it, and leaving the step clears an interrupt that
    lost the race, so it never lands in the loop's own code or in another run.
    """

    __slots__ = ("lock", "run", "interrupted", "ident")

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.run: Run | None = None
        self.interrupted = False
        self.ident = 0

    def enter(self, run: Run) -> None:
        """Loop thread, before a step of `run`. Clears what an interrupt that landed after the last step's work
        but before its leave() left behind (see _execute's finally), so the next run can be interrupted."""
        with self.lock:
            if self.interrupted:
                raise_in(self.ident, None)
                self.interrupted = False
            self.run = run

    def leave(self) -> None:
        """Loop thread, after the step, however it ended."""
        while True:
            try:
                with self.lock:
                    if self.interrupted:
                        raise_in(self.ident, None)  # clear an interrupt that lost the race
                        self.interrupted = False
                    self.run = None
                    return
            except Interrupt:
                continue  # it landed before we took the lock: cleared now, go round again

    def interrupt(self, run: Run, exc: type[Interrupt], again: bool = False) -> bool:
        """Watchdog (main thread): raise `exc` in the loop thread if it is inside a step of `run` (`again`: even if
        an interrupt was raised in this step already)."""
        with self.lock:
            if self.run is not run or (self.interrupted and not again):
                return False
            self.interrupted = True
            raise_in(self.ident, exc)
            return True


class _Stepped:
    """Awaitable that drives a coroutine one step at a time under a Step (see Step)."""

    __slots__ = ("coro", "run", "step")

    def __init__(self, coro: Coroutine[Any, Any, Any], run: Run, step: Step) -> None:
        self.coro, self.run, self.step = coro, run, step

    def __await__(self) -> Generator[Any, Any, Any]:
        send, throw, step, run = self.coro.send, self.coro.throw, self.step, self.run
        value: Any = None
        error: BaseException | None = None
        while True:
            try:
                step.enter(run)
                yielded = send(value) if error is None else throw(error)
            except StopIteration as stop:
                step.leave()
                return stop.value
            except BaseException:
                step.leave()
                raise
            step.leave()
            try:
                value, error = (yield yielded), None
            except BaseException as exc:  # noqa: B036 - a cancel (or anything) thrown in: pass it to the coroutine
                value, error = None, exc


class AsyncPool:
    def __init__(self, pool: Pool, concurrency: int, loop_kind: str = "asyncio") -> None:
        if concurrency < 1:
            raise ConfigError("--async-concurrency must be at least 1")
        if loop_kind not in ("asyncio", "uvloop"):
            raise ConfigError(f"--event-loop must be asyncio or uvloop, not {loop_kind!r}")
        if loop_kind == "uvloop":
            try:
                import uvloop  # noqa: F401
            except ImportError:
                raise ConfigError("--event-loop uvloop needs uvloop: pip install 'magne[uvloop]'") from None
        self.pool = pool
        self.concurrency = concurrency
        self.loop_kind = loop_kind
        self.inbox: deque[tuple[Delivery, tuple[Task, list[Any], dict[str, Any]] | None]] = deque()
        self.running: dict[int, Run] = {}  # id(run) -> run; the loop thread adds and removes, the watchdog reads
        self.lock = threading.Lock()  # a run's finished/abandoned decision: whichever side comes first reports it
        self.step = Step()
        self.loop: asyncio.AbstractEventLoop | None = None
        self.thread: threading.Thread | None = None
        self.beat = time.monotonic()
        self.stalls = 0  # times the loop was held past LAG_WARNING
        self.abandoned = 0
        self.time_limits: dict[str, int] = {}  # task -> cancels at its time limit (the loop thread writes, scrapes read)
        self._stalled_since = 0.0
        self._stall_by = ""  # who held the loop in the stall being reported
        self._pending = False
        self._cold = False  # a cold stop began: start nothing more (what waits goes back to the broker unstarted)
        self._stopping = False  # stop() was called: the loop may end
        self.failed = ""  # why the loop thread ended on its own (the worker then stops: see Worker._run)
        self._started = threading.Event()
        self._timers: tuple[Any, ...] = ()

    # -- lifecycle (main thread) ---------------------------------------------------------------
    def start(self) -> None:
        self.thread = threading.Thread(target=self._thread_main, name="magne-asyncio", daemon=True)
        self.thread.start()
        self._started.wait(10.0)

    def stop(self) -> None:
        """Main thread, after the I/O thread ended: stop the loop once it is idle (warm) or now (after a cold
        stop's grace, whatever still runs has its message back at the broker already)."""
        self._stopping = True
        loop = self.loop
        if loop is not None and not loop.is_closed():
            try:
                loop.call_soon_threadsafe(loop.stop)
            except RuntimeError:
                pass

    def join(self, timeout: float) -> None:
        if self.thread is not None:
            self.thread.join(timeout)

    def busy(self) -> int:
        return sum(1 for r in list(self.running.values()) if not r.abandoned)

    def status(self) -> str:
        return (f"async running={self.busy()} waiting={len(self.inbox)} of {self.concurrency} "
                f"loop_stalls={self.stalls} abandoned={self.abandoned}")

    def _thread_main(self) -> None:
        if self.loop_kind == "uvloop":
            import uvloop

            loop: asyncio.AbstractEventLoop = uvloop.new_event_loop()
        else:
            loop = asyncio.new_event_loop()
        self.loop = loop
        asyncio.set_event_loop(loop)
        self.step.ident = threading.get_ident()
        if self.pool.hooks:
            self._timers = self.pool.hooks.thread_timers()
        loop.call_soon(self._beat)
        loop.call_soon(self._start_more)  # whatever the I/O thread put in the inbox before the loop existed
        self._started.set()
        try:
            self._serve(loop)
        except BaseException as exc:  # noqa: B036 - never end silently: the worker sees `failed` and stops
            self.failed = f"the event loop thread crashed ({type(exc).__name__}: {wire.safe_text(exc, 200)})"
            log.exception("%s; the worker stops, its async messages go back to the queue", self.failed,
                          event="loop_crashed")
        for run in list(self.running.values()):
            run.why = ColdShutdown  # cut by the stop: its message goes back to the queue, it did not fail
        try:
            # Whatever still runs was cut by a cold stop (its message is back at the broker): cancel it and give it
            # a moment to unwind, so its finally blocks run and the loop closes without "destroyed but pending".
            left = [t for t in asyncio.all_tasks(loop) if not t.done()]
            for t in left:
                t.cancel()
            if left:
                loop.run_until_complete(asyncio.wait(left, timeout=1.0))
            loop.run_until_complete(loop.shutdown_asyncgens())
        except BaseException as exc:  # noqa: B036 - the process is stopping; say so and close the loop anyway
            log.warning("event loop did not wind down cleanly (%s); closing it", type(exc).__name__)
        finally:
            loop.close()

    def _serve(self, loop: asyncio.AbstractEventLoop) -> None:
        """Run the loop until stop() asks. Task code may stop it (`loop.stop()`) or raise SystemExit or
        KeyboardInterrupt from a background task it started (asyncio lets those two out of run_forever): either
        would leave every later async message waiting unstarted forever, so the loop is entered again."""
        restarts: deque[float] = deque(maxlen=20)
        while True:
            try:
                loop.run_forever()
            except BaseException as exc:  # noqa: B036 - see above; nothing from task code may end this thread
                restarts.append(time.monotonic())
                if len(restarts) == restarts.maxlen and restarts[-1] - restarts[0] < 1.0:
                    raise  # the loop cannot run at all: give up, so that the worker stops and is restarted
                log.error("the event loop was stopped by %s raised in async task code; running it again",
                          type(exc).__name__, event="loop_restarted")
                continue
            if self._stopping:
                return
            log.error("the event loop was stopped by async task code (loop.stop()); running it again",
                      event="loop_restarted")

    def dead(self) -> bool:
        """Main thread: the loop thread ended without being asked to."""
        return self.thread is not None and not self.thread.is_alive() and not self._stopping

    def _beat(self) -> None:
        self.beat = time.monotonic()
        assert self.loop is not None
        self.loop.call_later(BEAT, self._beat)

    # -- taking deliveries (I/O thread, pool threads) ------------------------------------------------
    def put(self, d: Delivery, resolved: tuple[Task, list[Any], dict[str, Any]] | None = None) -> None:
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
            # A fresh context per run: else each would start with what the run that finished before it had set
            # (this is called at the end of a run, inside its context).
            run.atask = loop.create_task(self._execute(run), context=contextvars.Context())
            run.atask.add_done_callback(functools.partial(self._never_began, run))
            run.timer = loop.call_at(loop.time() + (run.deadline - time.monotonic()), self._expire, run)

    def _begin(self, d: Delivery, resolved: tuple[Task, list[Any], dict[str, Any]] | None) -> Run | None:
        """A Run for a delivery, or None if it was decided here (a bad message) or belongs to the pool."""
        pool = self.pool
        if resolved is None:
            try:
                resolved = pool._resolve(d)
            except BaseException as exc:  # noqa: B036 - a bad message (or magne's bug): its failure, decided now
                pool._failed_hooked(d, None, [], {}, exc, None, 0.0, ())
                pool.report(d)
                return None
        t, args, kwargs = resolved
        if not t.is_async:  # a thread task's message on an async task's queue: the pool runs it (decoding again)
            pool.work.put(d)
            return None
        return Run(d, t, args, kwargs, t.time_limit or pool.time_limit)

    def _expire(self, run: Run) -> None:
        """Loop thread, at the run's deadline: cancel it (the coroutine sees CancelledError)."""
        if not run.begun and run.atask is not None and not run.atask.done():
            # A loop held past the deadline may run this timer before the run's first step (uvloop runs due timers
            # first); a task cancelled before it starts never reports. Cancel it once it has begun.
            assert self.loop is not None
            self.loop.call_soon(self._expire, run)
            return
        if run.atask is not None and not run.atask.done() and run.why is None:
            task = logs.clean(run.d.task, 100)
            log.warning("task %s (message %s) passed its time limit; cancelling its coroutine", task,
                        run.d.message_id(), event="time_limit", task=task)
            self.time_limits[run.task.name] = self.time_limits.get(run.task.name, 0) + 1
            run.why = TimeLimitExceeded
            run.cancelled = True
            run.atask.cancel()

    def _never_began(self, run: Run, _atask: asyncio.Task[None]) -> None:
        """Loop thread, when a run's asyncio Task is done: one cancelled before its first step (a cold stop as the
        loop winds down) never ran _execute, so its message is given back here."""
        if run.begun:
            return
        run.atask = None
        self.running.pop(id(run), None)
        with self.lock:
            if run.abandoned:
                return
            run.finished = True
        run.d.outcome = Outcome.GIVE_BACK  # it never started: it does not count as a delivery attempt
        self.pool.report(run.d)

    async def _execute(self, run: Run) -> None:
        run.begun = True
        pool, d, t = self.pool, run.d, run.task
        hooks = pool.hooks
        info: TaskRun | None = None
        exc: BaseException | None = None
        try:
            if hooks.full:
                info = TaskRun(t, d, run.args, run.kwargs)
                if hooks.before:
                    hooks.before_task(info)
            await _Stepped(t.fn(*run.args, **run.kwargs), run, self.step)
        except BaseException as e:  # noqa: B036 - whatever the coroutine raised is its task's failure
            exc = e
        finally:
            if run.timer is not None:
                run.timer.cancel()
            self.running.pop(id(run), None)
            if self.step.run is run:  # an interrupt landed between the step and its leave(): clear it now
                self.step.leave()
            run.atask = None  # no cycle between the run and its Task's coroutine frame
        seconds = time.monotonic() - run.started
        with self.lock:
            abandoned = run.abandoned
            run.finished = not abandoned
        if abandoned:
            log.warning("abandoned task %s (message %s) came back after %.1fs; its result is discarded",
                        d.task, d.message_id(), seconds, event="abandoned_returned", task=d.task)
            self._start_more()
            return
        if exc is not None:
            if isinstance(exc, asyncio.CancelledError | Interrupt) and run.why is not None:
                exc = run.why(*exc.args)  # our cancel or interrupt: a time limit, or a cold stop
            pool._failed_hooked(d, t, run.args, run.kwargs, exc, info, run.started, self._timers)
        else:
            for fn in self._timers:
                try:
                    fn(d.task, "success", seconds)
                except BaseException as e:  # noqa: B036 - a hook changes no outcome
                    report_hook_failure(fn, e)
            if info is not None:
                info.started, info.duration = run.started, seconds
                hooks.after_success(info)
        pool.report(d)
        self._start_more()

    # -- the watchdog (main thread) -----------------------------------------------------------------------
    def check(self, now: float) -> None:
        """Called by the worker's main thread every tick: report a held loop, interrupt or abandon overdue runs."""
        lag = now - self.beat
        if lag >= LAG_WARNING:
            if not self._stalled_since:
                self._stalled_since = self.beat
                self.stalls += 1
                held = self.step.run
                who = (f"task {logs.clean(held.d.task, 100)} (message {held.d.message_id()})" if held is not None
                       else "code outside any task")
                self._stall_by = who
                log.warning("event loop blocked for %.1fs so far by %s: an async def task is running blocking code; "
                            "the other async tasks wait until it returns (heartbeats go on: the I/O thread owns them)",
                            lag, who, event="loop_blocked", task=held.d.task if held is not None else "")
        elif self._stalled_since:
            log.info("event loop running again after being blocked for %.1fs by %s", self.beat - self._stalled_since,
                     self._stall_by, event="loop_unblocked")
            self._stalled_since = 0.0
        lost_after = self.pool.lost_after
        for run in list(self.running.values()):
            over = now - run.deadline
            if over < lost_after or run.finished:
                continue
            # A run holding the loop gets TimeLimitExceeded raised in its step, and again every second while it still
            # holds it (an interrupt can be swallowed where it lands: a garbage-collector callback during the step
            # reports and drops it), abandoned or not: the loop must come back for the others.
            if self.step.run is run and (not run.interrupted or now - run.interrupted_at >= 1.0):
                if self.step.interrupt(run, run.why or TimeLimitExceeded, again=run.interrupted):
                    if not run.interrupted:
                        log.error("task %s (message %s) is %.0fs past its time limit and holds the event loop; "
                                  "raising TimeLimitExceeded in it", run.d.task, run.d.message_id(), over,
                                  event="time_limit", task=run.d.task)
                    run.why = run.why or TimeLimitExceeded
                    run.interrupted, run.interrupted_at = True, now
                    continue
            if not run.abandoned and (not run.interrupted or over >= 2 * lost_after):
                self._abandon(run, over)

    def _abandon(self, run: Run, over: float) -> None:
        """Main thread: decide the message of a run that did not end after its cancel (or interrupt)."""
        with self.lock:
            if run.finished or run.abandoned:
                return
            run.abandoned = True
        self.abandoned += 1
        d = run.d
        out = d.copy()  # the coroutine may still write to `d`; the I/O thread gets its own copy
        if run.why is ColdShutdown:
            out.outcome = Outcome.REQUEUE
        else:
            limit = run.task.time_limit or self.pool.time_limit
            self.pool._fail(out, Failure("time limit", TimeLimitExceeded(
                f"task ran past its time limit of {limit:g}s and did not stop within {self.pool.lost_after:g}s of "
                "being cancelled; abandoned")))
        log.error("task %s (message %s) did not stop %.0fs after its time limit: abandoning its coroutine, its "
                  "message is %s, its place goes to the next task", d.task, d.message_id(), over,
                  out.outcome.name.lower(), event="task_abandoned", task=d.task)
        self.pool.report(out)
        loop = self.loop
        if loop is not None:
            try:
                loop.call_soon_threadsafe(self._forget, run)
            except RuntimeError:
                pass

    def _forget(self, run: Run) -> None:
        """Loop thread: free an abandoned run's place."""
        self.running.pop(id(run), None)
        self._start_more()

    def interrupt_all(self) -> None:
        """Cold shutdown (main thread): start nothing more, cancel every running coroutine; their messages are
        requeued."""
        self._cold = True
        loop = self.loop
        for run in list(self.running.values()):
            run.why = ColdShutdown
            if run.atask is not None and loop is not None:
                try:
                    loop.call_soon_threadsafe(run.atask.cancel)
                except RuntimeError:
                    pass
            if self.step.interrupt(run, ColdShutdown):
                run.interrupted = True
