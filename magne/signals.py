"""Signals for the worker and the supervisor, one way: handlers set flags and wake the main thread's Waker.

Why a Waker (magne.engine.waker: one write of a few bytes, no lock): a handler runs on the
main thread between two bytecodes, possibly while that thread holds a lock; `Event.set()`
from a handler deadlocked one cold-shutdown test run in three when the signal landed inside
the Event's own lock. A handler here only counts the signal and wakes; the main loop waits
with `wait()` and acts on the counts.
"""

from __future__ import annotations

import signal
from collections import Counter
from types import FrameType

from magne.engine.waker import Waker


class Signals:
    """Counts of received signals, and a wait that wakes when one arrives. Made on the main thread (it installs the
    handlers and unblocks the signals there); the rest main thread only too."""

    def __init__(self, *signums: int) -> None:
        self.counts: Counter[int] = Counter()
        self.order: list[int] = []  # arrival order, for "second SIGINT means cold"
        self._waker = Waker()
        for s in signums:
            signal.signal(s, self._handler)
        # A worker started by the supervisor holds these blocked until now (magne.children): a stop that arrived
        # while it was importing is delivered here, to the handler, instead of killing it.
        signal.pthread_sigmask(signal.SIG_UNBLOCK, signums)

    def _handler(self, signum: int, _frame: FrameType | None) -> None:
        self.counts[signum] += 1
        self.order.append(signum)
        self.wake()

    def wake(self) -> None:
        """A handler, or another thread (the I/O thread once it is consuming)."""
        self._waker.wake()

    def request_stop(self) -> None:
        """The worker stopping itself (main thread): counts as a SIGTERM, a warm stop."""
        self.order.append(signal.SIGTERM)
        self.wake()

    def wait(self, seconds: float) -> None:
        """Sleep up to `seconds`, less if a signal arrives."""
        self._waker.wait(seconds)

    def take(self, signum: int) -> bool:
        """True (once per arrival) if `signum` arrived since the last take."""
        if self.counts[signum]:
            self.counts[signum] -= 1
            return True
        return False

    def stops(self) -> int:
        """How many stop requests (SIGTERM, SIGINT) arrived in all."""
        return sum(1 for s in self.order if s in (signal.SIGTERM, signal.SIGINT))

    def cold(self) -> bool:
        """SIGQUIT, or a SIGINT after an earlier stop request: stop cold."""
        if signal.SIGQUIT in self.order:
            return True
        stops = [s for s in self.order if s in (signal.SIGTERM, signal.SIGINT)]
        return len(stops) >= 2 and signal.SIGINT in stops[1:]
