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
from magne.leader import STREAM, Scheduler, log
from magne.publisher import Publisher, default_publisher


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


def scheduler_argv(opts: Any) -> list[str]:
    """The scheduler's options of magne.worker.Options as a supervised child's argv (magne.supervisor)."""
    argv = [] if opts.scheduler else ["--no-scheduler"]
    if opts.schedule_grace != 300.0:
        argv += ["--schedule-grace", str(opts.schedule_grace)]
    if opts.schedule_stream != STREAM:
        argv += ["--schedule-stream", opts.schedule_stream]
    return argv


_OWN: dict[str, Publisher] = {}


def publisher_for(opts: Any) -> Publisher:
    """The Publisher whose Client a worker's scheduler and gate ride: the process's default one, which a worker
    points at its own broker (its --url, else MAGNE_URL: magne.worker); one of its own only where the default is
    magne.testing's stand-in."""
    pub = default_publisher()
    if isinstance(pub, Publisher):
        return pub
    key = repr(opts.url)
    if key not in _OWN:
        _OWN[key] = Publisher(opts.url, opts.queue_type)
    return _OWN[key]


def start_scheduler(opts: Any, tasks: dict[str, Any]) -> Scheduler | None:
    """A worker's scheduler, started, if its tasks define schedules and it was not told --no-scheduler. It rides
    the process's default publisher's Client (the worker's own broker under a supervisor, which puts the URL in
    MAGNE_URL); a worker given --url of its own gets a Publisher for that URL. Main thread, once ready."""
    scheduled = [t for t in tasks.values() if t.schedule is not None]
    if not scheduled or not opts.scheduler:
        if scheduled:
            log.info("--no-scheduler: this worker never sends the ticks of %s", ", ".join(t.name for t in scheduled),
                     event="scheduler_off")
        return None
    pub = publisher_for(opts)
    sched = Scheduler(pub._running, scheduled, opts.schedule_stream, opts.queue_type, opts.schedule_grace)
    sched.start()
    return sched
