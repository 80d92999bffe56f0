"""What the dashboard remembers: task events (magne.events) folded into per-task totals, per-minute series and the
recent failures. Rebuilt at every start by replaying the events stream from its retention start, so it survives a
restart of the dashboard (Flower keeps its history in memory and loses it); bounded by the number of tasks and the
window it shows (WINDOW minutes), never by the number of events.

Threads: `add` runs on the publisher Client's loop thread (the stream's records, in order); `snapshot` on the web
server's thread. One lock between them, held for a dictionary update or a copy, never for I/O.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from typing import Any

WINDOW = 60  # minutes of per-minute series kept and shown
FAILURES = 50  # recent failures kept
SAMPLES = 500  # durations kept per task for its percentiles
MAX_NAMES = 2000  # tasks (and queues) tracked at most: anything that can write the stream cannot grow it without end
FAILED = ("retried", "dead-lettered")
MAX_EPOCH = 2**33  # seconds since 1970 (year 2242): an event time past it is forged
MAX_DURATION = 10 * 365 * 86400.0  # seconds: a longer run is not one a worker timed


class TaskStats:
    __slots__ = ("counts", "durations", "minutes")

    def __init__(self) -> None:
        self.counts: dict[str, int] = {}
        self.durations: deque[float] = deque(maxlen=SAMPLES)
        self.minutes: dict[int, list[float]] = {}  # minute -> [done, failed, duration sum, runs timed]


class History:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.tasks: dict[str, TaskStats] = {}
        self.failures: deque[dict[str, Any]] = deque(maxlen=FAILURES)
        self.queues: set[str] = set()
        self.events = 0
        self.first = 0.0  # time of the oldest event read (the replay reached back to it)

    def add(self, records: list[dict[str, Any]]) -> None:
        """Client loop thread: one batch of events. A record missing a field counts as far as it can."""
        with self.lock:
            horizon = int(time.time() // 60) - WINDOW
            for r in records:
                t, kind = r.get("t"), r.get("event")
                task = r.get("task")
                # A time the page can show (anything that may write the stream can write any number): before 1970
                # or past MAX_EPOCH is not one a worker wrote.
                if (not isinstance(t, int | float) or not 0 <= t <= MAX_EPOCH or not isinstance(kind, str)
                        or not isinstance(task, str)):
                    continue
                kind = kind[:40]
                task = task[:200] or "?"
                if task not in self.tasks and len(self.tasks) >= MAX_NAMES:
                    task = "(other tasks)"
                self.events += 1
                self.first = min(self.first, t) if self.first else t
                if isinstance(r.get("queue"), str) and len(self.queues) < MAX_NAMES:
                    self.queues.add(r["queue"][:255])
                st = self.tasks.get(task)
                if st is None:
                    st = self.tasks[task] = TaskStats()
                st.counts[kind] = st.counts.get(kind, 0) + 1
                minute = int(t // 60)
                in_window = horizon < minute <= horizon + WINDOW + 1  # never a future minute: they would pile up
                if in_window:
                    m = st.minutes.get(minute)
                    if m is None:
                        m = st.minutes[minute] = [0, 0, 0.0, 0]
                        for old in [k for k in st.minutes if k <= horizon]:
                            del st.minutes[old]
                    m[1 if kind in FAILED else 0] += 1
                d = r.get("duration")
                if isinstance(d, int | float) and 0 <= d <= MAX_DURATION:  # finite: sums stay JSON numbers
                    st.durations.append(float(d))
                    if in_window:
                        m[2] += d
                        m[3] += 1
                if kind in FAILED:
                    err = r.get("error") if isinstance(r.get("error"), dict) else {}
                    self.failures.appendleft({"t": t, "task": task, "event": kind, "id": _cut(r.get("id"), 255),
                                              "queue": _cut(r.get("queue"), 255), "reason": _cut(r.get("reason"), 300),
                                              "error": _cut(f"{err.get('type', '')}: {err.get('message', '')}"
                                                            .strip(": "), 600),
                                              "host": _cut(r.get("host"), 255), "pid": _cut(r.get("pid"), 20)})

    def snapshot(self) -> dict[str, Any]:
        """Web thread: the per-task table, series of the last WINDOW minutes, and recent failures (plain data)."""
        with self.lock:
            now_min = int(time.time() // 60)
            tasks = []
            for name, st in sorted(self.tasks.items()):
                durs = sorted(st.durations)
                series = [st.minutes.get(m, [0, 0, 0.0, 0]) for m in range(now_min - WINDOW + 1, now_min + 1)]
                last5 = series[-5:]
                tasks.append({
                    "task": name, "counts": dict(st.counts),
                    "succeeded": st.counts.get("succeeded", 0),
                    "failed": sum(st.counts.get(k, 0) for k in FAILED),
                    "cancelled": st.counts.get("cancelled", 0),
                    "rate_per_min": sum(m[0] + m[1] for m in last5) / 5,
                    "p50": _pct(durs, 0.5), "p95": _pct(durs, 0.95),
                    "series_done": [m[0] for m in series], "series_failed": [m[1] for m in series],
                    "series_latency": [m[2] / m[3] if m[3] else None for m in series],
                })
            return {"tasks": tasks, "failures": list(self.failures), "events": self.events, "since": self.first,
                    "queues": sorted(self.queues)}


def _cut(value: Any, limit: int) -> Any:
    """A value from the stream as kept for the page: a number as it is, anything else as a string of at most `limit`
    characters (a forged record's megabyte of text is not kept fifty times)."""
    if value is None or isinstance(value, int | float):
        return value
    return (value if isinstance(value, str) else str(value))[:limit]


def _pct(sorted_values: list[float], q: float) -> float | None:
    if not sorted_values:
        return None
    return sorted_values[min(len(sorted_values) - 1, int(q * len(sorted_values)))]
