"""The worker pool: N threads that run tasks and hand outcomes back to the I/O thread.

Also the time limits (design: "What hurts users"): a task past its limit gets
TimeLimitExceeded raised in its thread with PyThreadState_SetAsyncExc. The raise
happens only under the slot's lock while the slot is RUNNING, and the worker
leaves RUNNING under the same lock, clearing a pending exception that lost the
race, so the exception never surfaces in the worker's own code or in the next
task. A thread that does not come back within `lost_after` seconds (blocked in C
or a system call) is abandoned: its message is decided for it and a fresh thread
takes its place; whatever the old thread returns later is discarded.
"""

from __future__ import annotations

import ctypes
import dataclasses
import inspect
import itertools
import logging
import threading
import time
import traceback
from collections.abc import Callable
from queue import SimpleQueue
from typing import Any

from pamqp import commands

from magne import message, topology
from magne.amqp.frames import decode_properties
from magne.delivery import DEAD, REQUEUE, RETRY, Delivery
from magne.registry import Task
from magne.retries import RetryPolicy

log = logging.getLogger("magne.pool")

IDLE, RUNNING, LOST = 0, 1, 2

# Two prototypes of one C function: raising passes the exception class, clearing
# must pass NULL (a py_object None would set None as the pending "exception",
# which then kills the thread with a SystemError).
_set_async_exc = ctypes.PYFUNCTYPE(ctypes.c_int, ctypes.c_ulong, ctypes.py_object)(
    ("PyThreadState_SetAsyncExc", ctypes.pythonapi))
_clear_async_exc = ctypes.PYFUNCTYPE(ctypes.c_int, ctypes.c_ulong, ctypes.c_void_p)(
    ("PyThreadState_SetAsyncExc", ctypes.pythonapi))


class Interrupt(BaseException):
    """Raised inside a task's thread. A BaseException so `except Exception` in user code lets it through."""


class TimeLimitExceeded(Interrupt):
    pass


class ColdShutdown(Interrupt):
    pass


def _raise_in(ident: int, exc: type[BaseException] | None) -> None:
    """Raise `exc` in thread `ident` at its next bytecode boundary; None clears a pending one."""
    if exc is None:
        _clear_async_exc(ident, None)
    else:
        _set_async_exc(ident, exc)


class Slot:
    """One worker thread's state, shared with the watchdog under `lock`."""

    __slots__ = ("index", "thread", "ident", "lock", "state", "delivery", "deadline", "interrupted", "interrupted_at")

    def __init__(self, index: int) -> None:
        self.index = index
        self.thread: threading.Thread | None = None
        self.ident = 0
        self.lock = threading.Lock()
        self.state = IDLE
        self.delivery: Delivery | None = None
        self.deadline = 0.0
        self.interrupted: type[Interrupt] | None = None
        self.interrupted_at = 0.0

    def enter(self, d: Delivery, limit: float) -> None:
        with self.lock:
            self.delivery = d
            self.deadline = time.monotonic() + limit
            self.state = RUNNING

    def leave(self) -> bool:
        """Back to IDLE; False if the watchdog abandoned this thread meanwhile."""
        while True:
            try:
                with self.lock:
                    if self.interrupted is not None:
                        _raise_in(self.ident, None)  # clear an exception that lost the race
                        self.interrupted = None
                    if self.state == LOST:
                        return False
                    self.state = IDLE
                    self.delivery = None
                    return True
            except Interrupt:
                continue  # landed before we took the lock: it is cleared now, go round again


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
        self.slots: list[Slot] = []
        self.lost = 0
        self._names = itertools.count(1)

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
            if s.thread is not None and s.state != LOST:
                s.thread.join(max(0.0, deadline - time.monotonic()))

    def busy(self) -> int:
        return sum(1 for s in self.slots if s.state == RUNNING)

    def alive(self) -> int:
        return sum(1 for s in self.slots if s.thread is not None and s.thread.is_alive())

    def status(self) -> str:
        return f"threads live={self.alive()} busy={self.busy()} lost={self.lost}"

    # -- the watchdog (called periodically from the main thread) -----------------
    def check_time_limits(self) -> None:
        now = time.monotonic()
        for i, s in enumerate(self.slots):
            if s.state != RUNNING:
                continue
            with s.lock:
                if s.state != RUNNING:
                    continue
                if s.interrupted is None:
                    if now >= s.deadline:
                        d = s.delivery
                        log.warning("task %s (message %s) passed its time limit; interrupting its thread %s",
                                    d.task if d else "?", (d.message_id() if d else '?'), s.thread.name if s.thread else "?")
                        self._interrupt(s, TimeLimitExceeded, now)
                elif now - s.interrupted_at >= self.lost_after:
                    self.slots[i] = self._abandon(s)

    def interrupt_all(self) -> None:
        """Cold shutdown: interrupt every running task; its message is requeued."""
        now = time.monotonic()
        for s in self.slots:
            with s.lock:
                if s.state == RUNNING and s.interrupted is None:
                    self._interrupt(s, ColdShutdown, now)

    def _interrupt(self, s: Slot, exc: type[Interrupt], now: float) -> None:
        s.interrupted = exc
        s.interrupted_at = now
        _raise_in(s.ident, exc)

    def _abandon(self, s: Slot) -> Slot:
        """Under s.lock: give up on a thread that did not come back; return its replacement."""
        s.state = LOST
        self.lost += 1
        d = s.delivery
        assert d is not None
        out = d.copy()  # the old thread may still write to `d`; the I/O thread gets its own copy
        if s.interrupted is ColdShutdown:
            out.outcome = REQUEUE
        else:
            self._fail(out, "time limit", TimeLimitExceeded(
                f"thread did not stop within {self.lost_after:g}s of the time-limit interrupt; abandoned"))
        name = s.thread.name if s.thread else "?"
        fate = {REQUEUE: "requeued", RETRY: "retried", DEAD: "dead-lettered"}[out.outcome]
        log.error("thread %s did not stop for task %s (message %s) %.0fs after the interrupt: "
                  "abandoning it, its message is %s, starting a replacement thread",
                  name, out.task, out.message_id(), self.lost_after, fate)
        self.report(out)
        return self._spawn(s.index)

    # -- the worker threads ----------------------------------------------------
    def _thread_main(self, slot: Slot) -> None:
        slot.ident = threading.get_ident()
        while True:
            try:
                self._loop(slot)
                return
            except Interrupt:
                # The watchdog only raises while a task runs and leave() clears what
                # lost the race, so this needs a raise from outside the protocol;
                # keep the thread alive rather than shrink the pool.
                log.warning("thread %s caught a stray interrupt between tasks; continuing", threading.current_thread().name)

    def _loop(self, slot: Slot) -> None:
        get = self.work.get
        run = self._run
        report = self.report
        while True:
            d = get()
            if d is None:
                return
            run(slot, d)
            # _run leaves RUNNING itself; this catches the one path where an interrupt
            # landed between the task's return and that step.
            if slot.state != IDLE and not slot.leave():
                log.warning("abandoned thread %s came back from task %s (message %s); its result is discarded",
                            threading.current_thread().name, d.task, d.message_id())
                return
            report(d)

    def _run(self, slot: Slot, d: Delivery) -> None:
        try:
            name, args, kwargs = message.decode(d.body)
            t = self.tasks.get(name)
            if t is None:
                d.task = name
                raise message.BadMessage(f"unknown task {name!r}: no task of that name is registered in this worker")
            d.task = name
            limit = t.time_limit or self.time_limit
            try:
                slot.enter(d, limit)
                t.fn(*args, **kwargs)  # success keeps the delivery's default outcome, ACK
            finally:
                slot.leave()  # if this thread was abandoned meanwhile, _loop discards the result
        except message.BadMessage as exc:
            self._fail(d, "bad message", exc, retryable=False)
        except TimeLimitExceeded as exc:
            exc.args = (f"task ran past its time limit of {limit:g}s",)
            self._fail(d, "time limit", exc)
        except ColdShutdown:
            d.outcome = REQUEUE
        except TypeError as exc:
            if _binds(t.fn, args, kwargs):
                self._fail(d, "task raised", exc)
            else:
                self._fail(d, "wrong arguments", exc, retryable=False)
        except Exception as exc:
            self._fail(d, "task raised", exc)

    def _fail(self, d: Delivery, reason: str, exc: BaseException, retryable: bool = True) -> None:
        """Decide retry or dead letter, and prepare the copy to publish (cold path)."""
        d.reason = reason
        d.error = {"type": type(exc).__name__, "message": str(exc)[:4096]}
        if retryable:
            d.error["traceback"] = "".join(traceback.format_exception(exc))[-8192:]
        try:
            props = decode_properties(d.header)
            headers = dict(props.headers or {})
        except Exception:  # unreadable properties: keep the body, start fresh properties
            props, headers = commands.Basic.Properties(), {}
        try:
            retries = int(headers.get("x-magne-retries") or 0)
        except (TypeError, ValueError):
            retries = 0
        history = headers.get("x-magne-history")
        history = list(history)[-19:] if isinstance(history, list) else []
        history.append({"attempt": retries + 1, "reason": reason, "error-type": d.error["type"],
                        "error-message": d.error["message"][:512], "at": int(time.time())})
        headers["x-magne-history"] = history
        policy = self.policies.get(d.task)
        if retryable and policy is not None and policy.should_retry(exc, retries):
            d.outcome = RETRY
            d.delay = policy.backoff(retries)
            ms = topology.delay_ms(d.delay)
            headers["x-magne-retries"] = retries + 1
            d.copy_to = topology.delay_queue(d.queue, ms)
            d.copy_declare = topology.declare_delay(d.queue, ms, nowait=True)
        else:
            d.outcome = DEAD
            headers["x-magne-reason"] = reason
            headers["x-magne-queue"] = d.queue
            headers["x-magne-task"] = d.task
            headers["x-magne-retries"] = retries
            for key, value in d.error.items():
                headers[f"x-magne-error-{key}"] = value
            d.copy_to = topology.dead_queue(d.queue)
        props.headers = headers
        props.delivery_mode = 2
        d.copy_props = props


def _binds(fn: Callable[..., Any], args: list[Any], kwargs: dict[str, Any]) -> bool:
    try:
        inspect.signature(fn).bind(*args, **kwargs)
    except TypeError:
        return False
    except ValueError:  # no signature available (some builtins): assume it bound
        return True
    return True
