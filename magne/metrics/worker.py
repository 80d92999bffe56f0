"""One worker process's metrics: the collector that reads the I/O thread's counters and the pool at scrape time."""

from __future__ import annotations

import os
import time
from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry, ProcessCollector, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector

from magne import __version__
from magne.io.stats import Histogram, Tally

if TYPE_CHECKING:
    from magne.io.loop import IOThread
    from magne.pool import Pool

from magne.metrics.base import FINAL_ENV, log, parse_listen, serve, url_of
from magne.metrics.tasks import TaskMetrics


def _histogram(family: HistogramMetricFamily, labels: list[str], bounds: tuple[float, ...], counts: list[int] | list[float],
               total: float) -> None:
    """Add one histogram series from per-bucket (not cumulative) counts, the last being +Inf."""
    buckets = []
    acc = 0.0
    for bound, n in zip((*bounds, float("inf")), counts, strict=False):
        acc += n
        buckets.append(("+Inf" if bound == float("inf") else repr(float(bound)), acc))
    family.add_metric(labels, buckets, total)


def _from_histogram(family: HistogramMetricFamily, h: Histogram) -> None:
    counts, total = h.snapshot()
    _histogram(family, [], h.bounds, counts, total)


# -- the worker's collector (the HTTP server's thread) ------------------------------------------------
class WorkerCollector(Collector):
    """Everything one worker process shows, read at scrape time from the I/O thread's counters, the pool, the
    work queue and TaskMetrics. `collect` runs on the HTTP server's thread and only reads: racy reads of
    plain ints, dicts copied in one C call before iterating, no lock taken."""

    def __init__(self, io: IOThread, pool: Pool, tally: Tally, tasks: TaskMetrics, queues: list[str]) -> None:
        self.io = io
        self.pool = pool
        self.tally = tally
        self.tasks = tasks
        self.queues = queues

    def collect(self) -> Iterator[Metric]:
        io, pool, tally, stats = self.io, self.pool, self.tally, self.io.stats
        info = GaugeMetricFamily("magne_worker_info", "The worker process: its broker node, pid, queues, magne version.",
                                 labels=["node", "pid", "queues", "version"])
        info.add_metric([io.node, str(os.getpid()), ",".join(self.queues), __version__], 1)
        yield info
        connected = GaugeMetricFamily("magne_connected", "1 while the worker consumes on an open channel.")
        connected.add_metric([], 1 if io.ready.is_set() and io.consumer.phase.value == "consuming" else 0)
        yield connected

        single = len(self.queues) == 1  # then the I/O thread keeps only the totals (magne/io/consumer.py)
        for name, doc, table, total in (
            ("magne_messages_delivered", "Deliveries received from the broker, by queue.", tally.delivered,
             stats.delivered),
            ("magne_messages_redelivered", "Deliveries flagged redelivered by the broker (delivered before and not "
             "acked: a crash, a lost connection), by queue.", tally.redelivered, stats.redelivered),
        ):
            fam = CounterMetricFamily(name, doc, labels=["queue"])
            for q, v in sorted(({self.queues[0]: total} if single else table.copy()).items()):
                fam.add_metric([q], v)
            yield fam
        for name, doc, table in (
            ("magne_messages_acked", "Messages acked after their task succeeded, by queue and task.", tally.acked),
            ("magne_messages_retried", "Messages retried: a copy confirmed in a delay queue, then the original acked.",
             tally.retried),
            ("magne_messages_dead_lettered", "Messages dead-lettered: a copy confirmed in <queue>.dead, then the "
             "original acked (task=\"unknown\": the message named no registered task).", tally.dead),
            ("magne_messages_requeued", "Messages that ran and went back to their queue (cut short by a cold stop, or "
             "their retry/dead-letter copy could not be made).", tally.requeued),
        ):
            fam = CounterMetricFamily(name, doc, labels=["queue", "task"])
            for (q, t), v in sorted(table.copy().items()):
                fam.add_metric([q, t], v)
            yield fam
        for name, doc, value in (
            ("magne_messages_given_back", "Prefetched messages given back unstarted (basic.nack requeue) at a stop.",
             stats.given_back),
            ("magne_messages_stale", "Outcomes dropped because their channel was gone; those messages are redelivered.",
             stats.stale),
            ("magne_threads_lost", "Pool threads abandoned after not stopping for a time limit (then replaced).",
             pool.lost),
            ("magne_threads_replaced", "Pool threads that died and were replaced.", pool.replaced),
            ("magne_connect_failures", "Attempts to connect or reconnect that failed.", stats.connect_failures),
            ("magne_consumer_cancels", "Consumers the broker cancelled (queue deleted, its node down).", stats.cancels),
            ("magne_copy_failures", "Retry or dead-letter copies the broker refused or returned, or that were lost "
             "with the publishing connection (then published again).", stats.copy_failures),
        ):
            fam = CounterMetricFamily(name, doc)
            fam.add_metric([], value)
            yield fam
        aio = pool.aio  # the event loop of async def tasks, if any (magne.asyncpool)
        limits = pool.time_limits.copy()
        if aio is not None:
            for t, v in aio.time_limits.copy().items():
                limits[t] = limits.get(t, 0) + v
        fam = CounterMetricFamily("magne_time_limits", "Time-limit interrupts (thread tasks) and cancels (async "
                                  "tasks) fired, by task.", labels=["task"])
        for t, v in sorted(limits.items()):
            fam.add_metric([t], v)
        yield fam
        if aio is not None:
            for name, doc, value in (
                ("magne_event_loop_stalls", "Times the event loop of async tasks was held by blocking code for more "
                 "than 0.5 s.", aio.stalls),
                ("magne_async_tasks_abandoned", "Async tasks that did not stop after their time limit's cancel; their "
                 "messages were decided without them.", aio.abandoned),
            ):
                fam = CounterMetricFamily(name, doc)
                fam.add_metric([], value)
                yield fam
            for name, doc, value in (
                ("magne_async_tasks_running", "Async tasks running now on the event loop.", aio.busy()),
                ("magne_async_concurrency", "Async tasks allowed at once (--async-concurrency).", aio.concurrency),
                ("magne_async_messages_waiting", "Messages of async tasks waiting for a place on the event loop.",
                 len(aio.inbox)),
            ):
                g = GaugeMetricFamily(name, doc)
                g.add_metric([], value)
                yield g
        fam = CounterMetricFamily("magne_reconnects", "Reconnects of the consuming connection, by the cause of the loss "
                                  "they followed.", labels=["cause"])
        for cause, v in sorted(stats.reconnect_causes.copy().items()):
            fam.add_metric([cause], v)
        yield fam

        slots = list(pool.slots)
        now = time.monotonic()
        running = [(s.index, s.delivery, s.started) for s in slots if s.state.value == "running"]
        for name, doc, value in (
            ("magne_tasks_running", "Tasks running now (busy pool threads).", len(running)),
            ("magne_threads_live", "Pool threads alive.", sum(1 for s in slots if s.thread is not None
                                                               and s.thread.is_alive())),
            ("magne_threads", "Pool threads configured (--threads).", pool.size),
            ("magne_messages_waiting", "Prefetched messages waiting for a free thread.", _waiting(pool)),
            ("magne_copies_pending", "Retry and dead-letter copies not confirmed yet (their originals stay unacked).",
             io.settlement.pending_copies()),
        ):
            g = GaugeMetricFamily(name, doc)
            g.add_metric([], value)
            yield g
        ages = GaugeMetricFamily("magne_task_running_seconds", "How long each running task has run, by thread slot.",
                                 labels=["slot", "task"])
        for index, d, started in running:
            if d is not None:
                ages.add_metric([str(index), tally.label(d.task)], max(0.0, now - started))
        yield ages

        dur = HistogramMetricFamily("magne_task_duration_seconds", "Task run time by task and outcome (success, retry, "
                                    "dead, requeue).", labels=["task", "outcome"])
        buckets = self.tasks.buckets
        for (task, outcome), h in sorted(self.tasks.snapshot().items()):
            _histogram(dur, [task, outcome], buckets, h[:-1], h[-1])
        yield dur
        lag = HistogramMetricFamily("magne_io_loop_lag_seconds", "How late the I/O thread ran its timers (heartbeats, "
                                    "deadlines) after it meant to: the time one busy turn of reading and settling took.")
        _from_histogram(lag, tally.lag)
        yield lag
        batch = HistogramMetricFamily("magne_ack_batch_size", "Messages settled by one write-out of acks (coalesced "
                                      "into multiple acks where the finished tags run on).")
        _from_histogram(batch, tally.ack_batch)
        yield batch
        confirm = HistogramMetricFamily("magne_copy_confirm_seconds", "Publishing connection: time from writing a "
                                        "retry or dead-letter copy to the broker's confirm.")
        _from_histogram(confirm, tally.confirm)
        yield confirm


def _waiting(pool: Pool) -> int:
    try:
        return pool.work.qsize()  # at a stop it also holds the threads' stop sentinels: a few more, briefly
    except Exception:
        return 0


class WorkerMetrics:
    """--metrics for one worker process: builds the collector, serves it, writes the final snapshot at exit.

    Made and started by the worker's main thread; the HTTP server runs on its own daemon thread."""

    def __init__(self, listen: str, tasks: Iterable[str]) -> None:
        self.host, self.port = parse_listen(listen)
        self.tally = Tally(set(tasks))
        self.task_metrics = TaskMetrics(self.tally.known)
        self.registry = CollectorRegistry(auto_describe=False)
        self.server: Any = None
        self.bound = 0

    def start(self, io: IOThread, pool: Pool, queues: list[str]) -> int:
        """Main thread, before connecting: register the collectors and listen. Returns the bound port."""
        ProcessCollector(registry=self.registry)
        self.registry.register(WorkerCollector(io, pool, self.tally, self.task_metrics, queues))
        self.server, self.bound = serve(self.registry, self.host, self.port)
        return self.bound

    @property
    def url(self) -> str:
        return url_of(self.host, self.bound)

    def write_final(self) -> None:
        """Main thread, as the process ends: under a supervisor, leave the last counters for it to keep."""
        folder = os.environ.get(FINAL_ENV)
        if not folder:
            return
        try:
            path = os.path.join(folder, f"{os.getpid()}.prom")
            tmp = path + ".tmp"
            with open(tmp, "wb") as f:
                f.write(generate_latest(self.registry))
            os.replace(tmp, path)
        except Exception as exc:  # best effort: the supervisor then keeps its last scrape
            log.warning("could not leave the final metrics for the supervisor: %s", exc)


# -- the supervisor's endpoint ---------------------------------------------------------------------------
