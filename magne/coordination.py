"""A worker's fleet-wide features, wired in one place: the gate of its limited queues (magne.gate) and its
scheduler candidacy (magne.leader), both riding the process's publisher Client.

Built by the worker's main thread after the I/O thread and the pool (the gate puts itself between them), and
driven by it: `start()` once the worker is ready, `stopping()` when a warm stop begins (the schedule locks
are given up at once, so another worker leads within a second), `stop()` at the end.
"""

from __future__ import annotations

from typing import Any

from magne import gate as gates
from magne.gate import Gate
from magne.leader import Scheduler, publisher_for, start_scheduler


class Coordination:
    def __init__(self, opts: Any, tasks: dict[str, Any], queues: list[str], consumer: Any, pool: Any) -> None:
        self.opts, self.tasks = opts, tasks
        self.gate: Gate | None = None
        if any(t.limit for t in tasks.values()):  # else no gate, no publisher: nothing changes for the worker
            self.gate = gates.install(tasks, queues, consumer, pool, opts.effective_prefetch,
                                      publisher_for(opts)._running)
        self.scheduler: Scheduler | None = None

    def parts(self) -> tuple[Scheduler | None, Gate | None]:
        """For the metrics collector (magne.metrics.coordination), on the HTTP server's thread."""
        return self.scheduler, self.gate

    def start(self) -> None:
        if self.gate is not None:
            self.gate.start()
        self.scheduler = start_scheduler(self.opts, self.tasks)

    def stopping(self) -> None:
        if self.scheduler is not None:
            self.scheduler.stop()
            self.scheduler = None

    def stop(self) -> None:
        self.stopping()
        if self.gate is not None:
            self.gate.stop()

    def status(self) -> dict[str, object]:
        return self.gate.status() if self.gate is not None else {}
