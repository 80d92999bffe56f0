"""One worker process: the I/O thread, the pool, and the main thread that ties them.

The main thread owns the signals and the time-limit watchdog; it never touches the
socket. Lifecycle (design.md): connect and consume first, then start the pool and
report ready; SIGTERM or a first SIGINT stops warmly, a second SIGINT, SIGQUIT or
the shutdown timeout stops cold.
"""

from __future__ import annotations

import dataclasses
import importlib
import logging
import os
import select
import signal
import sys
import time
from queue import SimpleQueue
from types import FrameType

from magne.amqp.url import URLError, parse_url, resolve_url
from magne.delivery import Delivery
from magne.io_thread import IOThread
from magne.pool import Pool
from magne.registry import REGISTRY, Task, queues_of
from magne.retries import RetryPolicy

log = logging.getLogger("magne.worker")

EXIT_OK, EXIT_FAILED, EXIT_CONFIG = 0, 1, 2


class ConfigError(Exception):
    """Something the user must fix before a worker can start (exit code 2)."""


@dataclasses.dataclass
class Options:
    modules: list[str]
    url: str | None = None
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


def select_queues(tasks: dict[str, Task], wanted: list[str] | None) -> list[str]:
    known = queues_of(tasks)
    if not wanted:
        return known
    unknown = [q for q in wanted if q not in known]
    if unknown:
        raise ConfigError(f"no registered task uses queue(s) {', '.join(unknown)}; known queues: {', '.join(known)}")
    return list(dict.fromkeys(wanted))


def queue_types(tasks: dict[str, Task], queues: list[str], default: str) -> dict[str, str]:
    """Each consumed queue's type: its tasks' queue_type, else the worker's --queue-type."""
    types: dict[str, str] = {}
    for t in tasks.values():
        if t.queue not in queues:
            continue
        qt = t.queue_type or default
        if types.setdefault(t.queue, qt) != qt:
            raise ConfigError(f"tasks on queue {t.queue} disagree on its queue_type ({types[t.queue]} vs {qt})")
    for q in queues:
        types.setdefault(q, default)
    return types


class Worker:
    def __init__(self, opts: Options, tasks: dict[str, Task]) -> None:
        if opts.threads < 1:
            raise ConfigError("--threads must be at least 1")
        if opts.effective_prefetch < 1 or opts.effective_prefetch > 65535:
            raise ConfigError("--prefetch must be between 1 and 65535")
        try:
            self.params = parse_url(resolve_url(opts.url))
        except URLError as exc:
            raise ConfigError(str(exc)) from None
        self.opts = opts
        self.tasks = tasks
        self.queues = select_queues(tasks, opts.queues)
        try:
            retry = RetryPolicy(opts.max_retries, opts.min_backoff, opts.max_backoff)
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
        self.work: SimpleQueue[Delivery | None] = SimpleQueue()
        self.io = IOThread(self.params, self.queues, opts.effective_prefetch, self.work,
                           queue_types(tasks, self.queues, opts.queue_type))
        self.pool = Pool(opts.threads, tasks, self.work, self.io.report, opts.time_limit, opts.lost_after, retry)
        self._signals = 0  # warm-stop requests seen (SIGTERM/SIGINT); 2+ means cold
        self._cold = False
        self._status = False
        # Signal handlers only set flags and write this pipe: an Event.set() from a handler
        # deadlocks when the signal lands while the main thread holds the Event's own lock.
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)
        os.set_blocking(self._wake_w, False)

    # -- signals (they only set flags; the main loop acts) ---------------------------
    def _on_stop_signal(self, signum: int, _frame: FrameType | None) -> None:
        if signum == signal.SIGQUIT:
            self._cold = True
        else:
            self._signals += 1
            if self._signals >= 2 and signum == signal.SIGINT:
                self._cold = True
        self._wake()

    def _on_status_signal(self, _signum: int, _frame: FrameType | None) -> None:
        self._status = True
        self._wake()

    def _wake(self) -> None:
        try:
            os.write(self._wake_w, b"x")
        except BlockingIOError:
            pass  # already plenty of wake-ups pending

    def _sleep(self, seconds: float) -> None:
        """Wait up to `seconds`, or less if a signal arrived."""
        if select.select([self._wake_r], [], [], seconds)[0]:
            try:
                os.read(self._wake_r, 4096)
            except BlockingIOError:
                pass

    def install_signals(self) -> None:
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGQUIT):
            signal.signal(sig, self._on_stop_signal)
        signal.signal(signal.SIGUSR1, self._on_status_signal)

    # -- lifecycle -----------------------------------------------------------------
    def run(self) -> int:
        io, pool, opts = self.io, self.pool, self.opts
        io.start()
        while not (io.ready.is_set() or io.finished.is_set()):
            if self._signals or self._cold:
                io.request_stop(force=True)
            io.ready.wait(0.1)
        if not io.ready.is_set():
            if io.failed:
                log.error("cannot start: %s", io.failed)
                return EXIT_FAILED
            return EXIT_OK  # stopped by a signal before it connected
        pool.start()
        _tell_supervisor_ready()
        log.info("ready: connected to %s, consuming %s with %d threads, prefetch %d per queue, time limit %gs; %s",
                 self.params.safe_url(), ", ".join(self.queues), opts.threads, opts.effective_prefetch,
                 opts.time_limit, pool.status())
        tick = min(0.25, max(0.02, min([t.time_limit or opts.time_limit for t in self.tasks.values()]) / 20))
        warm_deadline = cold_deadline = 0.0
        while not io.finished.is_set():
            self._sleep(tick)
            now = time.monotonic()
            pool.check_time_limits()
            if self._status:
                self._status = False
                log.info("status: %s; %s", pool.status(), io.stats.line())
            if self._signals and not warm_deadline:
                warm_deadline = now + opts.shutdown_timeout
                log.info("warm shutdown: no new tasks, waiting up to %gs for %d running ones (signal again to stop cold)",
                         opts.shutdown_timeout, pool.busy())
                io.request_stop()
            if warm_deadline and now >= warm_deadline and not self._cold:
                log.warning("shutdown timeout of %gs passed; stopping cold", opts.shutdown_timeout)
                self._cold = True
            if self._cold and not cold_deadline:
                log.warning("cold shutdown: interrupting %d running tasks; their messages are requeued", pool.busy())
                cold_deadline = now + 3.0
                pool.interrupt_all()
                io.request_stop()
            if cold_deadline and (pool.busy() == 0 or now >= cold_deadline):
                io.request_stop(force=True)
        pool.stop()
        pool.join(1.0)
        log.info("stopped: %s; %s", io.stats.line(), pool.status())
        if io.failed:
            return EXIT_FAILED
        return EXIT_OK


def _tell_supervisor_ready() -> None:
    """Under `--processes`, the supervisor waits for this byte before it stops old workers on a reload."""
    fd = os.environ.pop("MAGNE_READY_FD", None)
    if fd is None:
        return
    try:
        os.write(int(fd), b"r")
        os.close(int(fd))
    except (OSError, ValueError):
        pass
