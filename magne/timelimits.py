"""Time limits: raising an exception inside a running task's thread, safely.

A task past its limit gets TimeLimitExceeded raised in its thread with
PyThreadState_SetAsyncExc (design: "What hurts users"). The raise happens only
under the slot's lock while the slot is RUNNING, and the thread leaves RUNNING
under the same lock, clearing a pending exception that lost the race, so the
exception never surfaces in the worker's own code or in the next task.
"""

from __future__ import annotations

import ctypes
import enum
import threading
import time

from magne.delivery import Delivery
from magne.errors import Interrupt

# Two prototypes of one C function: raising passes the exception class, clearing
# must pass NULL (a py_object None would set None as the pending "exception",
# which then kills the thread with a SystemError).
_set_async_exc = ctypes.PYFUNCTYPE(ctypes.c_int, ctypes.c_ulong, ctypes.py_object)(
    ("PyThreadState_SetAsyncExc", ctypes.pythonapi))
_clear_async_exc = ctypes.PYFUNCTYPE(ctypes.c_int, ctypes.c_ulong, ctypes.c_void_p)(
    ("PyThreadState_SetAsyncExc", ctypes.pythonapi))


def raise_in(ident: int, exc: type[BaseException] | None) -> None:
    """Raise `exc` in thread `ident` at its next bytecode boundary; None clears a pending one."""
    if exc is None:
        _clear_async_exc(ident, None)
    else:
        _set_async_exc(ident, exc)


class SlotState(enum.Enum):
    IDLE = "idle"
    RUNNING = "running"
    LOST = "lost"  # abandoned by the watchdog; a replacement thread took its place


class Slot:
    """One worker thread's state, shared with the watchdog (main thread) under `lock`."""

    __slots__ = ("index", "thread", "ident", "lock", "state", "delivery", "deadline", "started",
                 "interrupted", "interrupted_at", "timers")

    def __init__(self, index: int) -> None:
        self.index = index
        self.thread: threading.Thread | None = None
        self.ident = 0
        self.lock = threading.Lock()
        self.state = SlotState.IDLE
        self.delivery: Delivery | None = None
        self.deadline = 0.0
        self.started = 0.0
        self.interrupted: type[Interrupt] | None = None
        self.interrupted_at = 0.0
        self.timers: tuple = ()  # this thread's after_run hooks (magne.hooks.HookSet.thread_timers), if any

    def enter(self, d: Delivery, limit: float) -> None:
        """Pool thread, before the task's code runs."""
        with self.lock:
            self.delivery = d
            self.started = time.monotonic()
            self.deadline = self.started + limit
            self.state = SlotState.RUNNING

    def leave(self) -> bool:
        """Pool thread, after the task's code: back to IDLE; False if the watchdog abandoned this thread meanwhile."""
        while True:
            try:
                with self.lock:
                    if self.interrupted is not None:
                        raise_in(self.ident, None)  # clear an exception that lost the race
                        self.interrupted = None
                    if self.state is SlotState.LOST:
                        return False
                    self.state = SlotState.IDLE
                    return True
            except Interrupt:
                continue  # landed before we took the lock: it is cleared now, go round again

    def interrupt(self, exc: type[Interrupt], now: float) -> bool:
        """Watchdog (main thread), under `lock`: raise `exc` in the task once. False if not running."""
        if self.state is not SlotState.RUNNING or self.interrupted is not None:
            return False
        self.interrupted = exc
        self.interrupted_at = now
        raise_in(self.ident, exc)
        return True
