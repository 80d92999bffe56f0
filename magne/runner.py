"""The task-run protocol: what happens to one delivery between the I/O thread handing it over and getting it back.

    resolve  the delivery's body names a registered task with its arguments (else: a bad message, dead-lettered)
    before   before_task hooks, with a TaskRun (only when a hook wants one)
    run      the task's code under its time limit (magne.timelimits: the clock starts at the run's first step)
    decide   success keeps the default outcome (ack); any failure becomes retry, dead letter or requeue
             (magne.policy.decide), whatever the task raised, SystemExit included
    after    after_run, after_success or after_failure (and on_dead_letter) hooks, with the decision made
    report   the delivery goes back to the I/O thread (`report`), and nothing touches it afterwards

A run the watchdog abandoned (its message decided without it, magne/pool.py and magne/asyncpool.py) skips
`after` and `report` when it comes back: its message is settled already, so it is neither a success nor hooked.

One Runner per worker, shared by both kinds of run: pool threads run a plain task as one long step (`run` and
`run_hooked` below, on the calling pool thread); the event loop runs an `async def` task as a coroutine in many
steps (magne.asyncrun drives the same phases: `resolve`, `before`, `failed`, `after_success`/`after_failure`).
Without a registered hook a pool thread calls `run`, whose per-message path allocates and locks nothing more than
it did before hooks existed; `run_hooked` is chosen once per thread when a hook is registered.
"""

from __future__ import annotations

import dataclasses
import inspect
import time
from collections.abc import Callable
from typing import Any

from magne import formats, logs, wire
from magne.amqp.protocol import DEFAULT_FRAME_MAX
from magne.cancels import CancelSet, covered, message_id_of
from magne.chords import callback_args, on_success
from magne.delivery import Delivery, Outcome
from magne.errors import BadMessage, Cancelled, ColdShutdown, Interrupt, TimeLimitExceeded
from magne.hooks import HookSet, registered
from magne.hooks import _report as report_hook_failure
from magne.policy import Failure, RetryPolicy, dead_letter_plainly, decide
from magne.registry import Task
from magne.taskrun import DECISIONS, TaskRun
from magne.timelimits import Slot
from magne.workflow import asks, on_cancelled, pipeline_of

log = logs.Log("magne.runner")

Resolved = tuple[Task, list[Any], dict[str, Any]]
Timers = tuple[Callable[[str, str, float], None], ...]


class Runner:
    """The protocol's phases and settings. Built by the worker's main thread (through Pool); its methods are called
    by pool threads, the event loop's thread, hook threads (magne.asyncrun) and the watchdog (`fail`), and keep no
    state of their own between calls, so any of those threads may call them at once."""

    def __init__(self, tasks: dict[str, Task], report: Callable[[Delivery], None], time_limit: float = 600.0,
                 lost_after: float = 10.0, retry: RetryPolicy | None = None, queue_types: dict[str, str] | None = None,
                 frame_max: int = DEFAULT_FRAME_MAX, hooks: HookSet | None = None) -> None:
        self.tasks = tasks
        self.report = report
        self.time_limit = time_limit
        self.lost_after = lost_after
        default = retry or RetryPolicy()
        # Each task's policy: its own settings over the worker's defaults, merged once here.
        self.policies = {name: dataclasses.replace(default, **t.retry_options) for name, t in tasks.items()}
        self.queue_types = queue_types or {}
        self.frame_max = frame_max
        # The lifecycle hooks (magne.hooks): those registered when the runner is made, unless given.
        self.hooks = hooks if hooks is not None else HookSet(registered())
        # Where a pool thread hands an `async def` task it decoded: the event loop's `put` (magne.asyncpool), set by
        # the worker. None (magne.testing, Pool.run_one): the thread runs it to the end itself (Task.blocking).
        self.to_loop: Callable[[Delivery, Resolved], None] | None = None
        self.failures: dict[Delivery, BaseException] | None = None  # magne.testing keeps each failure's exception
        self.accept: formats.Accept | None = None  # other formats it reads (--accept dramatiq,celery): set by the worker
        # The message ids cancelled (magne.cancels): the worker's Follower fills it from the cancels stream.
        self.cancels = CancelSet()
        self.cancelled = 0  # messages acked as cancelled (their run threads count; a racy tally, for status)

    # -- resolve -----------------------------------------------------------------------------------------
    def resolve(self, d: Delivery) -> Resolved:
        """The registered task a delivery names, with its arguments; BadMessage if there is none, Cancelled if its id
        was cancelled, or its group or chord was (magne.cancels: an empty set costs one truth test, a non-empty one a
        header scan and a dict lookup or three). Any run thread."""
        cancels = self.cancels.ids
        if cancels and (covered(message_id_of(d.header), cancels) or covered(pipeline_of(d), cancels)):
            raise Cancelled("cancelled before it started")  # itself, its group, its chord or its pipeline
        if self.accept is not None:  # --accept: magne.formats reads magne's format and the others accepted
            resolved = formats.resolve(d, self.tasks, self.accept, self.time_limit)
            # A foreign message's own id (dramatiq's body, celery's header: what its producer knows it by).
            if cancels and d.meta is not None and d.meta.message_id in cancels:
                raise Cancelled("cancelled before it started")
            return resolved
        wire.check_encoding(d.header)
        name, args, kwargs = wire.decode(d.body)
        d.task = name
        t = self.tasks.get(name)
        if t is None:
            raise BadMessage(f"unknown task {logs.clean(name, 100)!r}: no task of that name is registered in this worker")
        return t, args, kwargs

    # -- a pool thread's run: one long step ---------------------------------------------------------------
    def run(self, slot: Slot, d: Delivery) -> bool:
        """Run one delivery on this pool thread without hooks; True if it went to the event loop instead (async task).
        The caller (Pool._loop) reports it, unless the watchdog abandoned the run meanwhile."""
        t: Task | None = None
        args: list[Any] = []
        kwargs: dict[str, Any] = {}
        try:
            t, args, kwargs = self.resolve(d)
            h = d.header  # a flag bit per message (is there a headers table?): only then does asks() look further
            asked = len(h) > 12 and h[12] & 0x20 and asks(h)
            if asked:  # its result, next step or chord (magne.workflow); a chord's callback gets its members' values
                args = callback_args(d, args)
            if t.is_async and self.to_loop is not None:
                self.to_loop(d, (t, args, kwargs))
                return True
            slot.start(d, t.time_limit or self.time_limit)
            try:
                result = t.blocking(*args, **kwargs)  # success keeps the delivery's default outcome, ACK
            finally:
                slot.leave()  # if this thread was abandoned meanwhile, Pool._loop discards the result
            if result is not None and inspect.isawaitable(result):  # a None check on the hot path, nothing more
                refuse_awaitable(result)
            if asked:
                on_success(d, t.name, result)
        except BaseException as exc:  # noqa: B036 - SystemExit, KeyboardInterrupt, ...: the task's failure
            self.failed(d, t, args, kwargs, cancelled_anyway(slot, d, exc))
        return False

    def run_hooked(self, slot: Slot, d: Delivery) -> bool:
        """`run` with the lifecycle hooks around the task (chosen once per thread, only when a hook is registered).

        Pool thread. before_task runs before the run's step and the after-hooks after it: the watchdog interrupts
        only inside the step, so no time limit lands in a hook. They run before the caller reports the delivery,
        while it is still this thread's. An abandoned run runs no after-hook (its message was decided without it).
        A TaskRun is made only if a hook other than after_run wants one (hooks.full)."""
        t: Task | None = None
        args: list[Any] = []
        kwargs: dict[str, Any] = {}
        info: TaskRun | None = None
        started = 0.0
        try:
            t, args, kwargs = self.resolve(d)
            h = d.header  # a flag bit per message (is there a headers table?): only then does asks() look further
            asked = len(h) > 12 and h[12] & 0x20 and asks(h)
            if asked:  # its result, next step or chord (magne.workflow); a chord's callback gets its members' values
                args = callback_args(d, args)
            if t.is_async and self.to_loop is not None:  # the event loop runs it, and its hooks
                self.to_loop(d, (t, args, kwargs))
                return True
            if self.hooks.full:
                info = self.before(t, d, args, kwargs)
            slot.start(d, t.time_limit or self.time_limit)
            started = slot.started
            try:
                result = t.blocking(*args, **kwargs)
            finally:
                slot.leave()
            if result is not None and inspect.isawaitable(result):
                refuse_awaitable(result)
            if asked:
                on_success(d, t.name, result)
        except BaseException as exc:  # noqa: B036 - as in run
            if slot.abandoned:
                return False
            seconds = time.monotonic() - started if started else 0.0  # the task's own time, before deciding
            exc = cancelled_anyway(slot, d, exc)
            self.failed(d, t, args, kwargs, exc)
            self.after_failure(d, t, args, kwargs, exc, info, started, seconds, slot.timers)
            return False
        if not slot.abandoned:
            self.after_success(d, info, started, time.monotonic() - started, slot.timers)
        return False

    # -- hooks (only with a hook registered) ----------------------------------------------------------------
    def before(self, t: Task, d: Delivery, args: list[Any], kwargs: dict[str, Any]) -> TaskRun | None:
        """The run's TaskRun, after the before_task hooks saw it; None if no hook wants one (hooks.full)."""
        if not self.hooks.full:
            return None
        info = TaskRun(t, d, args, kwargs)
        if self.hooks.before:
            self.hooks.before_task(info)
        return info

    def after_success(self, d: Delivery, info: TaskRun | None, started: float, seconds: float, timers: Timers) -> None:
        """after_run ("success") with the calling thread's timers, then after_success."""
        for fn in timers:  # HookSet.after_run, inlined: the per-message path under --metrics
            try:
                fn(d.task, "success", seconds)
            except BaseException as exc:  # noqa: B036 - a hook changes no outcome
                report_hook_failure(fn, exc)
        if info is not None:
            info.started, info.duration = started, seconds
            self.hooks.after_success(info)

    def after_failure(self, d: Delivery, t: Task | None, args: list[Any], kwargs: dict[str, Any], exc: BaseException,
                      info: TaskRun | None, started: float, seconds: float, timers: Timers) -> None:
        """The hooks of a failed run, its decision made (cold path): after_run with the decision if the task had
        started (`started`: its clock at the start, else 0), after_failure (and on_dead_letter) with a TaskRun, made
        here if the run has none (its message named no task). A message not due yet (magne.formats) did not fail."""
        if d.reason == "not due":
            return
        if started:
            decision = "cancelled" if d.reason == "cancelled" else DECISIONS[d.outcome]  # an ACK, but no success
            for fn in timers:
                try:
                    fn(d.task, decision, seconds)
                except BaseException as hook_exc:  # noqa: B036 - a hook changes no outcome
                    report_hook_failure(fn, hook_exc)
        if self.hooks.full:
            if info is None:
                info = TaskRun(t, d, args, kwargs)
            info.started, info.duration, info.exception = started, seconds, exc
            self.hooks.after_failure(info)

    # -- decide ----------------------------------------------------------------------------------------------
    def failed(self, d: Delivery, t: Task | None, args: list[Any], kwargs: dict[str, Any], exc: BaseException) -> None:
        """Whatever a run raised becomes its message's decision (the run's thread, cold path)."""
        if isinstance(exc, BadMessage):
            self.fail(d, Failure(getattr(exc, "reason", "bad message"), exc, retryable=False))
        elif isinstance(exc, formats.NotDue):  # a foreign message's eta: it waits on the broker, not here
            formats.defer(d, exc.seconds, self.frame_max)
        elif isinstance(exc, TimeLimitExceeded):
            logs.release_leaked_locks()
            limit = (t.time_limit if t else None) or self.time_limit
            exc.args = (f"task ran past its time limit of {limit:g}s",)
            self.fail(d, Failure("time limit", exc))
        elif isinstance(exc, ColdShutdown):
            logs.release_leaked_locks()
            d.outcome = Outcome.REQUEUE
        elif isinstance(exc, Cancelled):
            self.was_cancelled(d, exc)
        elif isinstance(exc, TypeError) and t is not None and not _binds(t.fn, args, kwargs):
            self.fail(d, Failure("wrong arguments", exc, retryable=False))
        else:
            if isinstance(exc, Interrupt):
                logs.release_leaked_locks()
            self.fail(d, Failure("task raised", exc))

    def fail(self, d: Delivery, failure: Failure) -> None:
        """Decide retry or dead letter and prepare the copy. Total: whatever a message or an exception holds, the
        delivery leaves with an outcome (cold path: the run's thread, or the watchdog for an abandoned run)."""
        if self.failures is not None:
            self.failures[d] = failure.exc
        try:
            if self.accept is not None and d.meta is None:  # failures in dramatiq's queues go to its .XQ
                formats.attach_home(d, self.accept)
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

    def was_cancelled(self, d: Delivery, exc: Cancelled) -> None:
        """A cancelled message (magne.cancels) is acked, never retried nor dead-lettered, and said so in the log (the
        run's thread, or the watchdog for an abandoned run; cold path)."""
        logs.release_leaked_locks()  # if it was raised into the task's thread inside logging (nothing otherwise)
        d.outcome = Outcome.ACK
        d.reason = "cancelled"  # what magne.events reports (an ACK with this reason is no success)
        self.cancelled += 1
        why = str(exc.args[0]) if exc.args else "cancelled while running"
        d.follow = None  # whatever a success made is void: the message's outcome is its cancel
        if asks(d.header):  # it asked for its result (or is a workflow's step): the result says it was cancelled
            try:
                d.follow = on_cancelled(d, why)
            except Exception as err:  # contained: the cancel stands; only its record is missing
                log.error("the cancel record of message %s could not be made (%s)", d.message_id(),
                          type(err).__name__, event="cancel_record_failed")
        task = logs.clean(d.task, 100) or "?"
        mid = d.message_id()
        log.info("message %s (task %s) from queue %s: %s", mid, task, d.queue, why, event="cancelled", task=task,
                 queue=d.queue, message_id=mid)

    def abandoned(self, d: Delivery, why: type[Interrupt] | None, what: str) -> Delivery:
        """Watchdog (main thread): the outcome of a run given up on (`what` says how), on a copy of its delivery (its
        own thread may still write to `d`): requeued if a cold stop cut it, else failed by its time limit."""
        out = d.copy()
        if why is ColdShutdown:
            out.outcome = Outcome.REQUEUE
        elif why is Cancelled:
            self.was_cancelled(out, Cancelled(what))
        else:
            self.fail(out, Failure("time limit", TimeLimitExceeded(what)))
        return out


def refuse_awaitable(result: Any) -> None:
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


def cancelled_anyway(slot: Slot, d: Delivery, exc: BaseException) -> BaseException:
    """A pool thread's failure: a run the watchdog cancelled (magne.cancel) whose task turned Cancelled into an
    exception of its own (`except BaseException: raise MyError`) was still cancelled: not retried nor dead-lettered."""
    if slot.why is Cancelled and slot.delivery is d and not isinstance(exc, Cancelled):
        return Cancelled("cancelled while running")
    return exc
