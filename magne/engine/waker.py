"""The one way magne wakes a thread that waits on a selector: a Waker.

An eventfd where the OS has one (Linux), else a non-blocking pipe. `wake()` may be called
from any thread and from a signal handler (one write of a few bytes, no lock: a handler runs
between two bytecodes of the main thread, possibly while it holds a lock, and
`Event.set()` from a handler deadlocked a cold-shutdown test one run in three). The
waiting thread selects on `fileno()` (an engine loop, beside its sockets) or calls `wait()`
(the log writer, the main thread of a worker or supervisor), and `clear()`s before it acts.

Used by: engine loops (the worker's I/O thread, each client's thread), magne.logs' writer,
magne.signals. A thread waiting for a *result* (a sender waiting for its confirm) waits on a
Future instead (magne.engine.client); an asyncio loop is woken by its own
`call_soon_threadsafe`.
"""

from __future__ import annotations

import os
import select
import threading

_EIGHT = (1).to_bytes(8, "little")


class Waker:
    __slots__ = ("_r", "_w")

    def __init__(self) -> None:
        if hasattr(os, "eventfd"):
            fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
            self._r = self._w = fd
        else:  # pragma: no cover - not Linux
            self._r, self._w = os.pipe()
            os.set_blocking(self._r, False)
            os.set_blocking(self._w, False)

    def fileno(self) -> int:
        return self._r

    def wake(self) -> None:
        """Any thread, or a signal handler."""
        try:
            os.write(self._w, _EIGHT)
        except (BlockingIOError, OSError):  # full: plenty of wake-ups pending; closed: nobody waits any more
            pass

    def clear(self) -> None:
        """The waiting thread, before it acts on what woke it."""
        try:
            while os.read(self._r, 4096):
                if self._r == self._w:  # an eventfd reads its whole count at once
                    break
        except (BlockingIOError, OSError):
            pass

    def wait(self, timeout: float) -> bool:
        """Block up to `timeout` seconds; True (and cleared) if woken."""
        try:
            ready = select.select([self._r], [], [], max(0.0, timeout))[0]
        except (OSError, ValueError):  # closed under us (a fork's child dropping the parent's waker)
            return False
        if ready:
            self.clear()
        return bool(ready)

    def close(self) -> None:
        for fd in {self._r, self._w}:
            try:
                os.close(fd)
            except OSError:
                pass
        self._r = self._w = -1


class Signal:
    """A thread waiting for something another thread (an engine loop) will tell it: a confirm, a reply.

    A lock held while unsignalled: only the loop's thread releases it (`set`), only the waiter acquires it
    (`wait`, bounded). Not threading.Event nor a Future: both take a Condition's lock in set(), and a waiter is
    often a task thread, into which a time limit can raise at any bytecode, possibly while it holds that
    Condition's lock inside wait(): the loop's thread would then block in set() forever. A release never
    blocks."""

    __slots__ = ("_lock",)

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._lock.acquire()

    def set(self) -> None:
        """The loop's thread."""
        if self._lock.locked():
            try:
                self._lock.release()
            except RuntimeError:  # released meanwhile by another set()
                pass

    def wait(self, timeout: float) -> bool:
        """The waiting thread: True if set since the last wait."""
        return self._lock.acquire(timeout=timeout)
