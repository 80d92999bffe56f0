"""One worker process: the I/O thread, the pool, and the main thread that ties them.

Threads of a worker process (docs/design-notes.md has the map):
- main thread (this module): signals, the time-limit watchdog (Pool.check), status and shutdown;
- `magne-io` (magne/io/loop.py): the only thread on the sockets;
- `worker-N` (magne/pool.py): run tasks;
- `magne-log` (magne/logs.py): hands log records to the handlers.

Lifecycle (design.md): connect and consume first, then start the pool and report
ready; SIGTERM or a first SIGINT stops warmly, a second SIGINT, SIGQUIT or the
shutdown timeout stops cold.
"""

from __future__ import annotations

import dataclasses
import importlib
import os
import signal
import sys
import time
from queue import Empty, SimpleQueue
from typing import TYPE_CHECKING

from magne import control, formats, limits, logs, publisher
from magne.amqp.protocol import DEFAULT_FRAME_MAX
from magne.amqp.url import Nodes, parse_urls
from magne.asyncpool import AsyncPool
from magne.coordination import Coordination
from magne.delivery import Delivery
from magne.errors import EXIT_CONFIG, EXIT_FAILED, EXIT_OK, ConfigError, URLError
from magne.hooks import HookSet, WorkerInfo, registered
from magne.io.loop import IOThread
from magne.policy import RetryPolicy
from magne.pool import Pool
from magne.queueplan import async_prefetch, consumer_timeouts, max_priorities, queue_kinds, queue_types, select_queues
from magne.registry import REGISTRY, Task
from magne.signals import Signals

if TYPE_CHECKING:
    from magne.metrics import WorkerMetrics

log = logs.Log("magne.worker")

COLD_GRACE = 3.0  # how long a cold stop waits for interrupted tasks before closing anyway


@dataclasses.dataclass
class Options:
    modules: list[str]
    url: str | list[str] | None = None  # one or several broker URLs (nodes of a cluster); None: MAGNE_URL
    threads: int = 8
    prefetch: int | None = None  # default: 2 x threads
    queues: list[str] | None = None
    shutdown_timeout: float = 30.0
    time_limit: float = 600.0
    lost_after: float = 10.0
    queue_type: str = "classic"
    max_retries: int = 0
    min_backoff: float = 1.0
    max_backoff: float = 300.0
    max_body_size: int = 0  # 0: no limit
    metrics: str | None = None  # HOST:PORT to serve Prometheus metrics on (magne.metrics); None: off
    async_concurrency: int = 100  # `async def` tasks running at once on the event loop (magne.asyncpool)
    event_loop: str = "asyncio"  # or "uvloop"
    scheduler: bool = True  # a candidate leader for its tasks' schedules (magne.leader); False: --no-scheduler
    schedule_grace: float = 300.0
    schedule_stream: str = "magne.schedule"
    accept: list[str] | None = None  # other formats to read besides magne's: "dramatiq", "celery" (magne.formats)
    dramatiq_queues: list[str] | None = None  # with accept dramatiq: which queues are dramatiq's (default: all)
    control: bool = True  # honour cancels and answer `magne inspect` (magne.control); off: neither
    events: bool = True  # publish task events to the stream magne.events (magne.events)

    @property
    def effective_prefetch(self) -> int:
        return self.prefetch if self.prefetch is not None else 2 * self.threads


def import_tasks(modules: list[str]) -> dict[str, Task]:
    """Import the task modules (current directory first on sys.path, as dramatiq does)."""
    if "" not in sys.path and os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    for name in modules:
        name = name[:-3].replace("/", ".") if name.endswith(".py") else name
        try:
            importlib.import_module(name)
        except Exception as exc:
            raise ConfigError(f"cannot import task module {name!r}: {type(exc).__name__}: {exc}") from exc
    if not REGISTRY:
        raise ConfigError(f"no @task found in {', '.join(modules)}")
    return dict(REGISTRY)


class Worker:
    def __init__(self, opts: Options, tasks: dict[str, Task]) -> None:
        if opts.threads < 1:
            raise ConfigError("--threads must be at least 1")
        if opts.effective_prefetch < 1 or opts.effective_prefetch > 65535:
            raise ConfigError("--prefetch must be between 1 and 65535")
        try:
            # Under a supervisor, child N starts from node N (so P processes spread evenly); alone, at random.
            slot = os.environ.get("MAGNE_PROCESS_SLOT", "")
            self.nodes = Nodes(parse_urls(opts.url), start=int(slot) - 1 if slot.isdigit() else None)
        except URLError as exc:
            raise ConfigError(str(exc)) from None
        self.params = self.nodes.current
        self.opts = opts
        self.tasks = tasks
        self.queues = select_queues(tasks, opts.queues)
        try:
            retry = RetryPolicy(opts.max_retries, opts.min_backoff, opts.max_backoff)
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
        types = queue_types(tasks, self.queues, opts.queue_type)
        try:
            self.accept = formats.plan(opts.accept, opts.dramatiq_queues, self.queues)
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
        delayed, foreign_decls = formats.dramatiq_setup(self.accept, max_priorities(tasks, self.queues))
        if any(types[q] != "classic" for q in self.accept.dramatiq_queues):
            raise ConfigError("dramatiq's queues are classic queues: give their tasks no quorum queue_type")
        self.queues += delayed  # dramatiq's <queue>.DQ: consumed so that delayed messages run when due
        types.update(dict.fromkeys(delayed, "classic"))
        self.metrics: WorkerMetrics | None = None
        hooks = registered()
        if opts.metrics:  # only then is prometheus_client imported: metrics off cost nothing
            from magne.metrics import WorkerMetrics

            self.metrics = WorkerMetrics(opts.metrics, tasks)
            hooks.append(self.metrics.task_metrics)
        self.hooks = HookSet(hooks)
        self.work: SimpleQueue[Delivery | None] = SimpleQueue()
        frame_max = self.params.frame_max or DEFAULT_FRAME_MAX  # the copies' budget (0 in the URL: no limit of ours)
        self.io = IOThread(self.nodes, self.queues, opts.effective_prefetch, self.work, types,
                           max_body=opts.max_body_size, copy_frame_max=frame_max,
                           consumer_timeouts=consumer_timeouts(tasks, self.queues, opts.time_limit, opts.lost_after),
                           tally=self.metrics.tally if self.metrics else None)
        self.io.consumer.max_priorities = max_priorities(tasks, self.queues)
        self.io.consumer.declarations = foreign_decls
        self.pool = Pool(opts.threads, tasks, self.work, self.io.report, opts.time_limit, opts.lost_after, retry,
                         types, frame_max, hooks=self.hooks)
        self.pool.runner.accept = self.accept if self.accept else None
        self.aio: AsyncPool | None = None
        if any(t.is_async for t in tasks.values()):
            self._route_async()
        if opts.url is not None:  # one broker for the process: its tasks' sends, results, chords, cancels and leases
            publisher.configure(opts.url, opts.queue_type)  # (else MAGNE_URL's, which --url would contradict)
        self.coord = Coordination(opts, tasks, self.queues, self.io.consumer, self.pool)  # schedules, limits
        self.control = control.for_worker(self) if opts.control or opts.events else None
        self.signals: Signals | None = None
        if any(p.tls and not p.verify for p in self.nodes.all):
            log.warning("TLS certificate checks are off (verify=verify_none): the connection is encrypted but the "
                        "broker is not authenticated", event="tls_unverified")

    def _route_async(self) -> None:
        """Some tasks are `async def`: start an event loop for them (magne.asyncpool) and feed it each queue whose
        tasks are all async straight from the I/O thread, with a prefetch that follows --async-concurrency. A
        queue shared by both kinds goes to the pool, whose threads hand its async tasks over."""
        opts = self.opts
        aio = self.aio = self.pool.aio = AsyncPool(self.pool.runner, self.work.put, opts.async_concurrency,
                                                     opts.event_loop)
        consumer = self.io.consumer
        consumer.unstarted_elsewhere.append(aio.take_unstarted)
        for q, kind in queue_kinds(self.tasks, self.queues).items():
            if kind == "async":
                consumer.sinks[q] = aio.put
                consumer.prefetches[q] = async_prefetch(opts.async_concurrency)
            elif kind == "mixed":
                both = min(65535, opts.effective_prefetch + async_prefetch(opts.async_concurrency))
                consumer.prefetches[q] = both
                log.warning("queue %s holds both thread and async def tasks: its prefetch is %d (the threads' and "
                            "the event loop's), and its async tasks wait for a free thread to reach the loop; give "
                            "the async tasks their own queue (@task(queue=...)) to keep the two apart", q, both,
                            event="mixed_queue", queue=q)

    def install_signals(self, early: Signals | None = None) -> None:
        """Main thread, before run(); `early`: the handlers installed before the task modules were imported."""
        self.signals = early or worker_signals()

    def status(self) -> dict[str, object]:
        out = {**self.io.stats.as_dict(), "threads_live": self.pool.alive(), "threads_busy": self.pool.busy(),
               "threads_lost": self.pool.lost, "threads_replaced": self.pool.replaced}
        out.update(self.coord.status())
        if self.aio is not None:
            out.update(async_running=self.aio.busy(), async_waiting=len(self.aio.inbox),
                       async_loop_stalls=self.aio.stalls, async_abandoned=self.aio.abandoned)
        return out

    def busy(self) -> int:
        """Tasks running now, thread and async (main thread)."""
        return self.pool.busy() + (self.aio.busy() if self.aio is not None else 0)

    def check(self, now: float) -> None:
        """The watchdog, every tick (main thread): time limits of both kinds, lost threads, a held event loop."""
        self.pool.check(now)
        if self.aio is not None:
            self.aio.check(now)
        if self.control is not None:
            self.control.check(now)

    def tasks_status(self) -> str:
        return self.pool.status() + (f"; {self.aio.status()}" if self.aio is not None else "")

    # -- lifecycle (main thread) --------------------------------------------------------------
    def run(self) -> int:
        try:
            if self.metrics is not None:
                self._serve_metrics()
            return self._run()
        finally:
            if self.metrics is not None:
                self.metrics.write_final()
            logs.flush()

    def _serve_metrics(self) -> None:
        """Main thread, before connecting: serve --metrics (ConfigError if the address is taken) and tell a
        supervisor the port, so its endpoint can scrape this process."""
        from magne.metrics import CoordinationCollector

        assert self.metrics is not None
        port = self.metrics.start(self.io, self.pool, self.queues)
        self.metrics.registry.register(CoordinationCollector(self.coord.parts))
        log.info("serving metrics on %s", self.metrics.url, event="metrics_listening", url=self.metrics.url)
        _tell_supervisor(f"m{port}\n".encode())

    def info(self) -> WorkerInfo:
        return WorkerInfo(os.getpid(), self.io.node, list(self.queues), self.opts.threads, sorted(self.tasks))

    def _run(self) -> int:
        io, pool, opts = self.io, self.pool, self.opts
        sig = self.signals or Signals()
        io.wake_main = sig.wake  # start the pool as soon as the I/O thread is consuming
        io.start()
        if self.control is not None:  # the pool starts once the cancels made until now are known
            self.control.start_in_background()
        while not ((io.ready.is_set() and (self.control is None or self.control.ready.is_set()))
                   or io.finished.is_set()):
            if sig.stops() or sig.cold():
                io.request_stop(force=True)
            sig.wait(0.1)
        if not io.ready.is_set():
            if io.failed:
                log.error("cannot start: %s", io.failed, event="start_failed")
                return EXIT_CONFIG if io.permanent else EXIT_FAILED
            return EXIT_OK  # stopped by a signal before it connected
        self.hooks.worker_start(self.info())
        pool.start()
        if self.aio is not None:
            self.aio.start()
        _tell_supervisor(b"r\n", last=True)
        self.coord.start()
        limits.warn_in_background(self.params, self.queues, self.io.consumer.queue_types)
        own = io.consumer.prefetches  # async and mixed queues' own prefetch
        prefetch = f"{opts.effective_prefetch} per queue" + (
            f" ({', '.join(f'{q}: {n}' for q, n in own.items())})" if own else "")
        log.info("ready: connected to %s, consuming %s with %d threads, prefetch %s, time limit %gs; %s",
                 io.node, ", ".join(self.queues), opts.threads, prefetch,
                 opts.time_limit, self.tasks_status(), event="ready", url=io.node)
        tick = min(0.25, max(0.02, min([t.time_limit or opts.time_limit for t in self.tasks.values()]) / 20))
        warm_deadline = cold_deadline = 0.0
        loop_died = False
        while not io.finished.is_set():
            sig.wait(tick)
            now = time.monotonic()
            self.check(now)
            if sig.take(signal.SIGUSR1):
                log.info("status: node %s; %s; %s", io.node, self.tasks_status(), io.stats.line(), event="status",
                         url=io.node, counters=self.status())
            if sig.take(signal.SIGHUP):
                # Reloading means new processes taking over from old ones: the supervisor's job. Dying of the
                # signal's default action would cut running tasks; keep running instead, and say so.
                where = (f"send SIGHUP to the supervisor (pid {os.getppid()})" if os.environ.get("MAGNE_PROCESS_SLOT")
                         else "run it under the supervisor (--processes 2 or more) and send SIGHUP there, or restart it "
                              "(SIGTERM stops it warmly)")
                log.warning("SIGHUP: a worker process cannot reload its own code; it keeps running (%d tasks running). "
                            "To reload, %s", self.busy(), where, event="reload_unsupported")
            if self.aio is not None and self.aio.dead() and not warm_deadline and not loop_died:
                # Cannot happen by design (AsyncPool._serve re-enters the loop after anything task code does); if it
                # does, its async messages would wait forever: stop, so a supervisor starts a fresh process.
                loop_died = True
                log.error("the event loop thread of async tasks ended (%s); stopping the worker so that it can be "
                          "restarted; unstarted messages go back to the queue", self.aio.failed or "no reason given",
                          event="loop_died")
                sig.request_stop()
            if sig.stops() and not warm_deadline:
                warm_deadline = now + opts.shutdown_timeout
                log.info("warm shutdown: no new tasks, waiting up to %gs for %d running ones (signal again to stop cold)",
                         opts.shutdown_timeout, self.busy(), event="warm_shutdown")
                io.request_stop()
                self.coord.stopping()
            cold = sig.cold() or (warm_deadline and now >= warm_deadline)
            if cold and not cold_deadline:
                if not sig.cold():
                    log.warning("shutdown timeout of %gs passed; stopping cold", opts.shutdown_timeout)
                log.warning("cold shutdown: interrupting %d running tasks; their messages are requeued", self.busy(),
                            event="cold_shutdown")
                cold_deadline = now + COLD_GRACE
                pool.interrupt_all()
                if self.aio is not None:
                    self.aio.interrupt_all()
                io.request_stop()
            if cold_deadline and (self.busy() == 0 or now >= cold_deadline):
                io.request_stop(force=True)
        if io.failed and not warm_deadline:
            self._after_io_death(sig)
        elif self.busy() and not sig.cold():
            # The I/O thread ended while tasks still run (a stop during a reconnect): let them finish up to
            # the shutdown timeout rather than cut them; their messages come back redelivered either way.
            deadline = warm_deadline or time.monotonic() + opts.shutdown_timeout
            log.info("waiting up to %.0fs for %d running tasks; the connection is gone, so their messages will be "
                     "redelivered", max(0.0, deadline - time.monotonic()), self.busy(), event="waiting_for_tasks")
            while self.busy() and time.monotonic() < deadline and not sig.cold():
                sig.wait(0.1)
                self.check(time.monotonic())
        self.coord.stop()
        pool.stop()
        if self.aio is not None:
            self.aio.stop()
            self.aio.join(1.0)
        pool.join(1.0)
        if self.control is not None:
            self.control.stop()
        self.hooks.worker_stop(self.info())
        log.info("stopped: %s; %s", io.stats.line(), self.tasks_status(), event="stopped", counters=self.status())
        return EXIT_FAILED if io.failed or loop_died else EXIT_OK

    def _after_io_death(self, sig: Signals) -> None:
        """The I/O thread died: start nothing new, let running tasks finish (their messages come back anyway)."""
        dropped = 0
        while True:
            try:
                d = self.work.get_nowait()
            except Empty:
                break
            dropped += d is not None
        if self.aio is not None:
            while self.aio.inbox:
                self.aio.inbox.popleft()
                dropped += 1
        deadline = time.monotonic() + self.opts.shutdown_timeout
        log.error("the I/O thread is gone: %d prefetched messages dropped unstarted; waiting up to %gs for %d running "
                  "tasks, then exiting (every unacked message returns to its queue)", dropped,
                  self.opts.shutdown_timeout, self.busy(), event="io_gone")
        while self.busy() and time.monotonic() < deadline and not sig.cold():
            sig.wait(0.1)
            self.check(time.monotonic())


def worker_signals() -> Signals:
    """The worker's handlers (main thread). Under the supervisor they are installed before the task modules are
    imported: the child holds these signals blocked until then (magne.children), and a thread a module starts at
    import inherits the mask of the moment, which must not be the blocked one (a process it starts would ignore
    SIGTERM). Alone, after the import, so that Ctrl-C still interrupts an import that hangs."""
    return Signals(signal.SIGTERM, signal.SIGINT, signal.SIGQUIT, signal.SIGUSR1, signal.SIGHUP)


def _tell_supervisor(line: bytes, last: bool = False) -> None:
    """Under `--processes`, one line to the supervisor over the pipe it gave us (MAGNE_READY_FD): `m<port>` (where
    this process serves its metrics), then `r` once ready (the supervisor waits for it before it stops old
    workers on a reload), after which the pipe is closed. One write of a few bytes: atomic on a pipe."""
    fd = os.environ.get("MAGNE_READY_FD")
    if fd is None:
        return
    if last:
        del os.environ["MAGNE_READY_FD"]
    try:
        os.write(int(fd), line)
        if last:
            os.close(int(fd))
    except (OSError, ValueError):
        pass
