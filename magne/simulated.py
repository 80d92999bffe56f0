"""magne.testing's periodic tasks and fleet-wide limits, on its simulated clock.

In a test there is one process and no broker, so there is nothing to elect and no token to lease:
the ticks a leader would send (magne.leader: same message ids, same headers) are made for the
simulated interval `Worker.advance()` covers, and a limited task's deliveries wait for their turn
as they would at the gate (magne.gate): at most `concurrency` running at once, at most N starts in
any simulated period; a waiting message is neither failed nor retried.

Called by magne.testing.Worker under its lock (the test's thread, or a pool thread that reports).
"""

from __future__ import annotations

import datetime as dt
from collections import deque
from typing import Any

from magne.leader import tick_message
from magne.schedule import UTC, tick_id


class Simulated:
    """The schedules and limits of a testing worker's tasks. `start`: the wall-clock time of simulated 0.0."""

    def __init__(self, tasks: dict[str, Any], start: dt.datetime | None = None) -> None:
        self.start = (start or dt.datetime.now(UTC)).astimezone(UTC)
        self.scheduled = [t for t in tasks.values() if t.schedule is not None]
        self.caps = {t.queue: t.limit.concurrency for t in tasks.values() if t.limit and t.limit.concurrency}
        self.rates = {t.queue: t.limit.rate for t in tasks.values() if t.limit and t.limit.rate}
        self.running: dict[str, int] = {}
        self.starts: dict[str, deque[float]] = {}
        self.slot_waits = self.rate_waits = 0

    def wall(self, clock: float) -> dt.datetime:
        return self.start + dt.timedelta(seconds=clock)

    def ticks(self, a: float, b: float) -> list[tuple[float, Any, str, bytes, bytes]]:
        """(simulated due time, task, message id, header, body) of every tick due in (a, b], in due order."""
        out = []
        for t in self.scheduled:
            for due in t.schedule.due_between(self.wall(a), self.wall(b)):
                header, body = tick_message(t, due, "magne.testing")
                out.append(((due - self.start).total_seconds(), t, tick_id(t.name, due), header, body))
        return sorted(out, key=lambda x: x[0])

    def admit(self, queue: str, clock: float, caps: bool = True) -> float | None:
        """None: a delivery of `queue` may start now (counted); else the simulated time to try it again."""
        cap, rate = self.caps.get(queue), self.rates.get(queue)
        if cap is None and rate is None:
            return None
        if caps and cap is not None and self.running.get(queue, 0) >= cap:
            self.slot_waits += 1
            return clock  # again once a run of it finished (join waits for the running ones first)
        if rate is not None:
            starts = self.starts.setdefault(queue, deque())
            while starts and starts[0] <= clock - rate[1]:
                starts.popleft()
            if len(starts) >= rate[0]:
                self.rate_waits += 1
                return starts[0] + rate[1]
            starts.append(clock)
        self.running[queue] = self.running.get(queue, 0) + 1
        return None

    def done(self, queue: str) -> None:
        if queue in self.running:
            self.running[queue] -= 1
