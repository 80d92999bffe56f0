"""Prometheus metrics: `magne worker --metrics HOST:PORT` (off unless asked).

Imported only when --metrics is given: with metrics off, prometheus_client is never
imported and nothing here runs.

How the figures are kept, and who pays for them:
- The I/O thread never touches a prometheus_client metric (their inc() takes a lock, and the
  I/O thread must never take a lock that task code can take). It keeps plain ints in
  magne/io/stats.py (`Stats`, and `Tally` with --metrics), which `WorkerCollector` reads at
  scrape time, on the HTTP server's thread.
- Task durations are counted by `TaskMetrics`, a hook (magne.hooks) on the pool threads. It
  keeps one plain tally per thread (no lock: each thread writes only its own; measured, a
  prometheus_client Histogram.observe() costs about 1 us, this about 0.3 us), summed at scrape.
- Gauges (tasks running, messages waiting, threads, copies pending) are read from the pool, the
  work queue and the I/O thread's state at scrape: nothing per message.
- Process CPU and memory: prometheus_client's own ProcessCollector.

Label cardinality is bounded: queues are the consumed ones, tasks the registered ones (a
message naming anything else counts as task="unknown"), causes and outcomes fixed sets, and
`slot` the pool's thread slots. A message can never create a series.

Under `--processes P` (supervisor aggregation, `SupervisorMetrics`): each child serves its own
metrics on an ephemeral 127.0.0.1 port and reports the port to the supervisor over the pipe it
already reports "ready" on; the supervisor's endpoint (the one HOST:PORT) scrapes the children
and shows every series per process (`process="1"`...) and summed (`process="all"`). Why this
and not prometheus_client's multiprocess mode (a directory of mmap files, the route dramatiq
took): that mode needs every counter to be a prometheus_client value (a lock and a write to an
mmap per increment, on the I/O thread: ruled out above), it cannot hold custom collectors such as
ours, its files must be wiped between runs and pile up with restarts (dramatiq #309 and #127 are
its lock and file troubles), and its gauges need a mode per metric. Aggregating in the supervisor
keeps each process's counters as plain ints and costs the children nothing until a scrape.

Counters never go backwards across restarts: when a child goes away, the supervisor adds its
last counter values to an offset for its process slot, so `process="1"` and the sums continue
from there instead of dropping to the new child's zero (Prometheus would read a drop as a
reset; `rate()` copes, but a dashboard's raw totals would not). The last values come from the
file a child writes as it exits (MAGNE_METRICS_FINAL: exact for every exit but SIGKILL and
hard crashes) or else from the supervisor's last scrape of it, which it refreshes every
REFRESH seconds: at most that much of a killed child's counts is missing from the totals,
and nothing is ever counted twice. Gauges of a dead child simply disappear.
"""

from __future__ import annotations

import bisect
import os
import queue as queue_mod
import threading
import time
import urllib.request
from collections.abc import Callable, Iterable, Iterator
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry, ProcessCollector, generate_latest, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.registry import Collector

from magne import __version__, logs
from magne.errors import ConfigError
from magne.hooks import Hook
from magne.io.stats import Histogram, Tally

if TYPE_CHECKING:
    from magne.io.loop import IOThread
    from magne.pool import Pool

log = logs.Log("magne.metrics")

DURATION_BUCKETS = (0.0001, 0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0,
                    600.0)
REFRESH = 5.0  # seconds between the supervisor's scrapes of its children (besides one per scrape of its own)
CHILD_TIMEOUT = 2.0  # seconds the supervisor waits for one child's metrics
FINAL_ENV = "MAGNE_METRICS_FINAL"  # a directory: a child writes <pid>.prom there as it exits


def parse_listen(text: str) -> tuple[str, int]:
    """`HOST:PORT`, `[IPv6]:PORT`, `:PORT` (every interface) or `PORT` (127.0.0.1 only) -> (host, port)."""
    text = text.strip()
    host, sep, port = text.rpartition(":")
    if not sep:
        host, port = "127.0.0.1", text
    elif not host:
        host = "0.0.0.0"
    host = host.strip("[]")
    try:
        number = int(port)
    except ValueError:
        raise ConfigError(f"--metrics wants HOST:PORT (or PORT for 127.0.0.1), got {text!r}") from None
    if not 0 <= number <= 65535:
        raise ConfigError(f"--metrics port must be between 0 and 65535, got {number}")
    return host, number


def serve(registry: CollectorRegistry, host: str, port: int) -> tuple[Any, int]:
    """Start prometheus_client's HTTP server on a daemon thread (`magne-metrics`); returns (server, bound port)."""
    try:
        server, thread = start_http_server(port, host, registry)
    except OSError as exc:
        raise ConfigError(f"--metrics {host}:{port}: cannot listen there ({exc.strerror or exc})") from None
    thread.name = "magne-metrics"
    return server, server.server_port


def url_of(host: str, port: int) -> str:
    shown = "127.0.0.1" if host in ("0.0.0.0", "") else (f"[{host}]" if ":" in host else host)
    return f"http://{shown}:{port}/metrics"


# -- the pool threads' part: a hook -------------------------------------------------------------
class TaskMetrics(Hook):
    """Task durations by task and outcome (success, retry, dead, requeue): magne_task_duration_seconds.

    A hook like any user's (magne.hooks), and an example of one that must cost almost nothing: each pool
    thread writes only its own tally (a dict of bucket lists, made on its first task), so there is no
    lock and no lost increment; `collect` (HTTP thread) sums them. A thread that died or was abandoned
    keeps its tally in `_tallies`, so counts never go backwards. Pool threads call the hook methods.
    """

    def __init__(self, known_tasks: Iterable[str], buckets: tuple[float, ...] = DURATION_BUCKETS) -> None:
        self.known = frozenset(known_tasks)
        self.buckets = buckets
        self._local = threading.local()
        # Per thread: task -> histogram of its successes, (task, outcome) -> histogram of the other outcomes.
        self._tallies: list[dict[Any, list[float]]] = []  # list.append is atomic under the GIL

    def _tally(self) -> dict[Any, list[float]]:
        tally: dict[Any, list[float]] = {}
        self._local.tally = tally
        self._tallies.append(tally)
        return tally

    def bind_thread(self) -> Callable[[str, str, float], None]:
        """Pool thread, once at its start (magne.hooks.HookSet.thread_timers): this thread's after_run, with its
        own tally bound in, so a message costs no thread-local lookup (about 0.25 us instead of 0.35)."""
        tally: dict[Any, list[float]] = {}
        self._tallies.append(tally)
        get, buckets, size, find = tally.get, self.buckets, len(self.buckets) + 2, bisect.bisect_left
        first = buckets[0]

        def after_run(task: str, outcome: str, seconds: float) -> None:
            key: Any = task if outcome == "success" else (task, outcome)
            h = get(key)
            if h is None:
                h = tally[key] = [0] * size
            h[0 if seconds <= first else find(buckets, seconds)] += 1  # tiny tasks, where this matters, skip the search
            h[-1] += seconds

        return after_run

    def after_run(self, task: str, outcome: str, seconds: float, _bisect: Any = bisect.bisect_left) -> None:
        """Pool thread, after each run of a registered task (so `task` is a bounded label). About 0.3 us."""
        try:
            tally = self._local.tally
        except AttributeError:
            tally = self._tally()
        key: Any = task if outcome == "success" else (task, outcome)  # the common case makes no tuple
        h = tally.get(key)
        if h is None:
            h = tally[key] = [0] * (len(self.buckets) + 2)  # one count per bucket, +Inf, then the sum
        h[_bisect(self.buckets, seconds)] += 1
        h[-1] += seconds

    def snapshot(self) -> dict[tuple[str, str], list[float]]:
        """Every thread's tally summed: (task, outcome) -> [count per bucket..., +Inf, sum]. Any thread."""
        total: dict[tuple[str, str], list[float]] = {}
        for tally in list(self._tallies):
            for key, h in tally.copy().items():
                if isinstance(key, str):
                    key = (key, "success")
                h = list(h)
                acc = total.get(key)
                if acc is None:
                    total[key] = h
                else:
                    for i, v in enumerate(h):
                        acc[i] += v
        return total


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
_CUMULATIVE = frozenset({"counter", "histogram", "summary"})
# Families that make no sense summed over processes (identities, ages, limits).
_NOT_SUMMED = frozenset({"magne_worker_info", "magne_task_running_seconds", "process_start_time_seconds",
                         "process_max_fds"})

Key = tuple[str, tuple[tuple[str, str], ...]]  # (sample name, sorted labels)


class _Family:
    __slots__ = ("name", "doc", "type")

    def __init__(self, name: str, doc: str, typ: str) -> None:
        self.name, self.doc, self.type = name, doc, typ


def parse(text: str) -> tuple[dict[str, _Family], dict[Key, float], dict[Key, str]]:
    """A child's exposition -> (families by name, sample values, sample key -> its family's name)."""
    families: dict[str, _Family] = {}
    values: dict[Key, float] = {}
    owner: dict[Key, str] = {}
    for fam in text_string_to_metric_families(text):
        families[fam.name] = _Family(fam.name, fam.documentation, fam.type)
        for s in fam.samples:
            if s.name.endswith("_created"):
                continue
            key = (s.name, tuple(sorted(s.labels.items())))
            values[key] = s.value
            owner[key] = fam.name
    return families, values, owner


class _Child:
    __slots__ = ("slot", "pid", "port", "values", "owner", "at")

    def __init__(self, slot: int, pid: int, port: int) -> None:
        self.slot, self.pid, self.port = slot, pid, port
        self.values: dict[Key, float] = {}
        self.owner: dict[Key, str] = {}
        self.at = 0.0  # when the request whose answer `values` holds was sent (0: never)


class SupervisorMetrics(Collector):
    """The supervisor's one endpoint for the whole tree (see the module docstring for why and how).

    The supervisor's main loop only calls `child_up` / `child_down` / `restarted`, which put events on a
    SimpleQueue (no lock, never blocks). The HTTP server's threads (`collect`) and the `magne-metrics-poll`
    thread apply them and fetch the children's metrics; they share `_lock`, which guards only dict updates
    and is never held across a network call. No task code runs in the supervisor.
    """

    def __init__(self, listen: str, final_dir: str) -> None:
        self.host, self.port = parse_listen(listen)
        self.final_dir = final_dir
        self.events: queue_mod.SimpleQueue[tuple[Any, ...]] = queue_mod.SimpleQueue()
        self._lock = threading.Lock()
        self.children: dict[int, _Child] = {}  # pid -> live child with a known port
        self.offsets: dict[int, dict[Key, float]] = {}  # slot -> counters kept from its children that went away
        self.offset_owner: dict[Key, str] = {}
        self.families: dict[str, _Family] = {}
        self.restarts: dict[int, int] = {}
        self.registry = CollectorRegistry(auto_describe=False)
        self.server: Any = None
        self.bound = 0
        self._stop = threading.Event()

    # -- the supervisor's main loop ------------------------------------------------------------------
    def child_up(self, slot: int, pid: int, port: int) -> None:
        self.events.put(("up", slot, pid, port))

    def child_down(self, pid: int) -> None:
        self.events.put(("down", pid))

    def restarted(self, slot: int) -> None:
        self.events.put(("restart", slot))

    def start(self) -> int:
        """Main thread: listen, and start the poller. Returns the bound port."""
        own = _Own(self)
        self.registry.register(own)
        self.server, self.bound = serve(self.registry, self.host, self.port)
        threading.Thread(target=self._poll, name="magne-metrics-poll", daemon=True).start()
        return self.bound

    def stop(self) -> None:
        self._stop.set()
        if self.server is not None:
            try:
                self.server.shutdown()
                self.server.server_close()
            except Exception:
                pass

    @property
    def url(self) -> str:
        return url_of(self.host, self.bound)

    # -- the HTTP and poller threads -----------------------------------------------------------------
    def _poll(self) -> None:
        while not self._stop.wait(REFRESH):
            try:
                self.refresh()
            except Exception as exc:  # never let the poller die
                log.warning("refreshing the worker processes' metrics failed: %s", exc)

    def _apply_events(self) -> None:
        """Under _lock: take in what the supervisor loop reported."""
        while True:
            try:
                ev = self.events.get_nowait()
            except queue_mod.Empty:
                return
            if ev[0] == "up":
                _, slot, pid, port = ev
                self.children[pid] = _Child(slot, pid, port)
            elif ev[0] == "down":
                child = self.children.pop(ev[1], None)
                if child is not None:
                    self._retire(child)
            elif ev[0] == "restart":
                self.restarts[ev[1]] = self.restarts.get(ev[1], 0) + 1

    def _retire(self, child: _Child) -> None:
        """Under _lock: a child went away; keep its counters in its slot's offset. Its final file, if it left one,
        is newer than our last scrape."""
        path = os.path.join(self.final_dir, f"{child.pid}.prom")
        try:
            with open(path, encoding="utf-8") as f:
                families, values, owner = parse(f.read())
            self.families.update(families)
            child.values, child.owner = values, owner
        except (OSError, ValueError):
            pass
        finally:
            for p in (path, path + ".tmp"):
                try:
                    os.unlink(p)
                except OSError:
                    pass
        offset = self.offsets.setdefault(child.slot, {})
        for key, value in child.values.items():
            fam = self.families.get(child.owner.get(key, ""))
            if fam is not None and fam.type in _CUMULATIVE:
                offset[key] = offset.get(key, 0.0) + value
                self.offset_owner[key] = fam.name

    def refresh(self) -> None:
        """Fetch every live child's metrics (outside the lock); keep the newest good answer of each. The poller and
        the HTTP server's threads (a scrape) call it, possibly at once: an answer is kept only if its request began
        after the one of the answer it would replace, so a slow older scrape never takes a counter backwards."""
        with self._lock:
            self._apply_events()
            targets = [(c.pid, c.port) for c in self.children.values()]
        got: dict[int, tuple[dict[str, _Family], dict[Key, float], dict[Key, str]]] = {}
        asked: dict[int, float] = {}
        for pid, port in targets:
            asked[pid] = time.monotonic()
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=CHILD_TIMEOUT) as resp:
                    got[pid] = parse(resp.read().decode("utf-8"))
            except Exception:
                continue  # gone or busy: its last values stand in
        with self._lock:
            self._apply_events()  # a child that went away meanwhile is retired with its previous values
            for pid, (families, values, owner) in got.items():
                child = self.children.get(pid)
                if child is None or asked[pid] <= child.at:
                    continue  # gone, or another thread kept a newer answer meanwhile
                self.families.update(families)
                child.values, child.owner, child.at = values, owner, asked[pid]

    def merged(self, own: Iterable[Metric] = ()) -> tuple[dict[str, _Family], dict[str, dict[Key, float]]]:
        """(families, family name -> {(sample, labels with process): value}): each child's series with its slot as
        `process` (its slot's offset added to counters), the supervisor's own `own` metrics as
        process="supervisor", and their sums as process="all". Under _lock."""
        families = dict(self.families)
        per_process: dict[str, dict[Key, float]] = {}
        owner: dict[Key, str] = dict(self.offset_owner)
        for slot, offset in self.offsets.items():
            per_process[str(slot)] = dict(offset)
        for child in self.children.values():
            acc = per_process.setdefault(str(child.slot), {})
            for key, value in child.values.items():
                acc[key] = acc.get(key, 0.0) + value
                owner[key] = child.owner.get(key, "")
        mine = per_process.setdefault("supervisor", {})
        for m in own:
            families.setdefault(m.name, _Family(m.name, m.documentation, m.type))
            for smp in m.samples:
                key = (smp.name, tuple(sorted(smp.labels.items())))
                mine[key] = smp.value
                owner[key] = m.name
        out: dict[str, dict[Key, float]] = {}
        for process, values in sorted(per_process.items()):
            for (name, labels), value in values.items():
                fam = owner.get((name, labels), "")
                if fam not in families:
                    continue
                series = out.setdefault(fam, {})
                series[(name, tuple(sorted((*labels, ("process", process)))))] = value
                if fam not in _NOT_SUMMED:
                    total = (name, tuple(sorted((*labels, ("process", "all")))))
                    series[total] = series.get(total, 0.0) + value
        return families, out


class _Own(Collector):
    """The supervisor endpoint's collector: every child's series with `process`, the sums, and its own counters."""

    def __init__(self, sup: SupervisorMetrics) -> None:
        self.sup = sup
        self.process = ProcessCollector(registry=None)

    def collect(self) -> Iterator[Metric]:
        sup = self.sup
        sup.refresh()
        own = list(self.process.collect())  # the supervisor's own CPU and memory, as process="supervisor"
        with sup._lock:
            families, out = sup.merged(own)
            restarts = dict(sup.restarts)
            alive = len(sup.children)
        for name in sorted(out):
            fam = families[name]
            metric = Metric(fam.name, fam.doc, fam.type)
            for (sample, labels), value in sorted(out[name].items()):
                metric.add_sample(sample, dict(labels), value)
            yield metric
        procs = GaugeMetricFamily("magne_supervisor_processes", "Worker processes whose metrics the supervisor reads.")
        procs.add_metric([], alive)
        yield procs
        fam = CounterMetricFamily("magne_supervisor_restarts", "Worker processes restarted after they died, by process "
                                  "slot.", labels=["process"])
        for slot, v in sorted(restarts.items()):
            fam.add_metric([str(slot)], v)
        yield fam
