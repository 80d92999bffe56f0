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
import inspect
import itertools
import logging
import threading
import time
import traceback
from collections.abc import Callable
from queue import SimpleQueue
from typing import Any

from magne import message
from magne.delivery import DEAD, REQUEUE, Delivery
from magne.registry import Task

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
    ) -> None:
        self.size = size
        self.tasks = tasks
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
            out.outcome = DEAD
            out.reason = "time limit"
            out.error = {"type": "TimeLimitExceeded",
                         "message": f"thread did not stop within {self.lost_after:g}s of the interrupt; abandoned"}
        name = s.thread.name if s.thread else "?"
        log.error("thread %s did not stop for task %s (message %s) %.0fs after the interrupt: "
                  "abandoning it, its message is %s, starting a replacement thread",
                  name, out.task, out.message_id(), self.lost_after, "requeued" if out.outcome == REQUEUE else "dead-lettered")
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
                            threading.current_thread().name, d.task, (d.message_id() if d else '?'))
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
            _dead(d, "bad message", exc, with_tb=False)
        except TimeLimitExceeded:
            _dead(d, "time limit", TimeLimitExceeded(f"task ran past its time limit of {limit:g}s"), with_tb=True)
        except ColdShutdown:
            d.outcome = REQUEUE
        except TypeError as exc:
            if _binds(t.fn, args, kwargs):
                _dead(d, "task raised", exc, with_tb=True)
            else:
                _dead(d, "wrong arguments", exc, with_tb=False)
        except Exception as exc:
            _dead(d, "task raised", exc, with_tb=True)


def _binds(fn: Callable[..., Any], args: list[Any], kwargs: dict[str, Any]) -> bool:
    try:
        inspect.signature(fn).bind(*args, **kwargs)
    except TypeError:
        return False
    except ValueError:  # no signature available (some builtins): assume it bound
        return True
    return True


def _dead(d: Delivery, reason: str, exc: BaseException, with_tb: bool) -> None:
    d.outcome = DEAD
    d.reason = reason
    d.error = {"type": type(exc).__name__, "message": str(exc)[:4096]}
    if with_tb:
        d.error["traceback"] = "".join(traceback.format_exception(exc))[-8192:]

