"""Test tasks in-process, with no broker and no waiting, and with the worker's own behaviour.

A test should see what a worker does with a message (the JSON body, registry lookup, the
argument check, the merged retry policy, the x-magne-* headers of its copies), so messages
run through magne.pool.Pool itself, on its threads and watchdog or inline (`threads=0`).
Only the broker is simulated: the worker stands in for the default publisher, keeps messages
in memory, and lets delays (retry backoffs, `send_with_options(delay=...)`) pass on a
simulated clock. pytest (a test dependency, not magne's) is imported only when the fixture
is: `from magne.testing import magne_worker  # noqa: F401` in conftest.py (PEP 562).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import datetime as dt
import heapq
import itertools
import threading
import time
from collections.abc import Awaitable, Iterable, Iterator
from queue import Empty, SimpleQueue
from typing import Any

from pamqp import commands

from magne import formats, publisher, topology, wire
from magne.amqp import codec
from magne.delivery import Delivery, Outcome
from magne.errors import BadMessage, RegistryError
from magne.localflow import LocalFlow
from magne.outgoing import check_delay
from magne.policy import RetryPolicy
from magne.pool import Pool
from magne.publisher import BatchResult
from magne.registry import REGISTRY, Task
from magne.simulated import Simulated

_OUTCOMES = {Outcome.ACK: "succeeded", Outcome.RETRY: "retried", Outcome.DEAD: "dead"}


class TooManyMessages(RuntimeError):
    """join() ran `max_messages` messages and more were due: a task that sends itself, or endless retries."""


@dataclasses.dataclass(frozen=True)
class Sent:
    """One message a `send()` published, decoded as a worker will read it (None where the body is not valid)."""

    task: str | None
    args: list[Any] | None
    kwargs: dict[str, Any] | None
    message_id: str | None
    queue: str
    delay: float | None
    body: bytes


@dataclasses.dataclass(frozen=True)
class Run:
    """One delivery that ran, and the outcome the pool decided for it."""

    task: str
    args: list[Any] | None  # as decoded from the JSON body; None if the body was not valid
    kwargs: dict[str, Any] | None
    message_id: str | None
    queue: str
    outcome: str  # "succeeded", "retried" or "dead"
    reason: str  # production's: "bad message", "wrong arguments", "task raised", "time limit"
    error_type: str
    error_message: str
    traceback: str  # empty for messages that can never run (bad message, wrong arguments), as in production
    retries: int  # retries made before this run (its x-magne-retries)
    attempts: list[dict[str, Any]]  # x-magne-history: the failed attempts so far, this one included if it failed
    headers: dict[str, Any]  # x-magne-* headers of the retry or dead-letter copy; {} on success
    delay: float  # a retry's delay (simulated seconds)
    at: float  # simulated time of the run
    exception: BaseException | None = dataclasses.field(default=None, repr=False, compare=False)


def _decoded(body: bytes) -> tuple[str | None, list[Any] | None, dict[str, Any] | None]:
    try:
        return wire.decode(body)
    except BadMessage:
        return None, None, None


def _seconds(delay: float | None) -> float:  # the delay production applies: its delay queue's TTL, rounded
    return topology.delay_ms(delay) / 1000 if delay is not None and delay > 0 else 0.0


class Worker:
    """`with worker() as w:` captures every send of any task and runs it as a worker process would.

    threads: pool threads (0, or sync=True: run at join() on the calling thread, without time limits).
    max_retries, min_backoff, max_backoff, time_limit, lost_after: the worker's defaults, as `magne worker`
    takes them; a task's own @task settings win over them. max_messages: join()'s guard against a task
    that never stops sending or retrying. raise_on_failure: join() re-raises the first final failure.
    accept: "dramatiq", "celery" or both, as `magne worker --accept`: `publish()` captured messages of those formats.
    Tasks are those registered when the block starts (a worker imports its tasks before it starts).
    """

    def __init__(self, threads: int = 8, *, sync: bool = False, max_retries: int = 0, min_backoff: float = 1.0,
                 max_backoff: float = 300.0, time_limit: float = 600.0, lost_after: float = 10.0,
                 raise_on_failure: bool = False, max_messages: int = 10_000, start: dt.datetime | None = None,
                 accept: str | list[str] | None = None) -> None:
        if threads < 0 or max_messages < 1:
            raise ValueError("threads must be >= 0 and max_messages >= 1")
        self.threads = 0 if sync else threads
        self.retry = RetryPolicy(max_retries, min_backoff, max_backoff)
        self.time_limit, self.lost_after = time_limit, lost_after
        self.raise_on_failure, self.max_messages = raise_on_failure, max_messages
        self.clock = 0.0  # simulated seconds since the block started
        self.accept = formats.parse_accept(accept)  # other formats to run, as `magne worker --accept` (every queue)
        self._epoch = time.time()  # the simulated clock's zero, for etas and expiries of foreign messages
        self.pool: Pool | None = None
        self._cond = threading.Condition()
        self._due: list[tuple[float, int, Delivery]] = []  # a heap of (due time, seq, delivery)
        self._seq = itertools.count(1)
        self._work: SimpleQueue[Delivery | None] = SimpleQueue()
        self._inflight = self._dispatched = 0
        self._budget = max_messages
        self._ticks = 0  # advance(): the ticks it sends do not count toward max_messages (a day of every=5 is 17280)
        self._sent: list[Sent] = []
        self._runs: list[Run] = []
        self._stop = threading.Event()
        self._watchdog: threading.Thread | None = None
        self._saved: Any = None
        self._start = start  # the wall-clock time of simulated 0.0 (periodic tasks' due times); None: now
        self.simulated: Simulated | None = None
        self.flow = LocalFlow()  # results, next steps and chords, in memory (magne.localflow)

    def __enter__(self) -> Worker:
        tasks = dict(REGISTRY)
        for t in tasks.values():  # @task checked these; a Task made by hand meets the worker's rule here too
            why = topology.queue_name_problem(t.queue)
            if why is not None:
                raise RegistryError(f"task {t.name!r}: queue name {str(t.queue)[:60]!r} {why}")
        types = {t.queue: t.queue_type or "classic" for t in tasks.values()}
        self.simulated = Simulated(tasks, self._start)
        pool = self.pool = Pool(self.threads, tasks, self._work, self._report, self.time_limit, self.lost_after,
                                self.retry, types)
        pool.runner.accept = formats.Accept(self.accept, frozenset(types) if "dramatiq" in self.accept else frozenset(),
                                            lambda: self._epoch + self.clock) if self.accept else None
        pool.runner.failures = {}  # each failure's exception object, so that raise_on_failure can re-raise it
        if self.threads:
            pool.start()
            tick = min(0.25, max(0.02, min([t.time_limit or self.time_limit for t in tasks.values()],
                                           default=self.time_limit) / 20))  # as magne.worker ticks its watchdog
            self._watchdog = threading.Thread(target=self._watch, args=(pool, tick), name="magne-testing-watchdog",
                                              daemon=True)
            self._watchdog.start()
        self._saved = publisher.set_default(self)  # the public seam: every task.send lands here while active
        return self

    def __exit__(self, *exc_info: object) -> None:
        """Drop what never started, let running tasks finish (up to lost_after), give the real publisher back."""
        try:
            self._stop.set()
            if self.threads and self.pool is not None:
                with contextlib.suppress(Empty):
                    while True:
                        self._work.get_nowait()
                self.pool.stop()
                self.pool.join(self.lost_after)
            if self._watchdog is not None:
                self._watchdog.join()
        finally:
            publisher.set_default(self._saved)

    def _exception(self, d: Delivery) -> BaseException | None:
        """The exception a failed delivery's run raised (kept by the runner for raise_on_failure), taken once."""
        failures = self.pool.runner.failures if self.pool is not None else None
        return failures.pop(d, None) if failures is not None else None

    def _watch(self, pool: Pool, tick: float) -> None:  # magne.worker's watchdog: time limits, lost threads
        while not self._stop.wait(tick):
            pool.check(time.monotonic())

    def publish(self, queue: str, body: bytes, properties: commands.Basic.Properties | bytes, exchange: str | None = None,
                delay: float | None = None, queue_type: str | None = None, declare: bool = True) -> None:
        """Publisher.publish into memory: while active, the worker is the default publisher, so every send lands here."""
        why = topology.queue_name_problem(queue)
        if why is not None:  # what a worker could never declare or consume is refused, not run
            raise ValueError(f"queue name {str(queue)[:60]!r} {why}")
        delay = check_delay(delay)  # the real publisher's rule: NaN, negative, infinite, too long are refused
        header = properties if isinstance(properties, bytes) else codec.header_payload(properties, len(body))
        if self.flow.holds(exchange, queue, body, header):
            return
        task, args, kwargs = _decoded(body)
        with self._cond:
            self._sent.append(Sent(task, args, kwargs, wire.read_state(header).message_id, queue, delay, body))
            self._enqueue(Delivery(next(self._seq), 0, queue, body, header, False), self.clock + _seconds(delay))

    def send(self, task: publisher.TaskLike, args: Any = (), kwargs: dict[str, Any] | None = None,
             delay: float | None = None, message_id: str | None = None, declare: bool = True,
             priority: int | None = None, headers: dict[str, Any] | None = None) -> str:
        """Publisher.send into memory (the README's `default_publisher().send(...)` in a test): the message id."""
        mid = message_id or wire.new_id()
        props = wire.properties_for(mid)
        props.priority, props.headers = (priority if priority is not None else getattr(task, "priority", None)), headers
        self.publish(task.queue, wire.encode(task.name, args, kwargs, mid), props, delay=delay,
                     queue_type=task.queue_type, declare=declare)
        return mid

    def send_many(self, items: Iterable[tuple[Any, ...]], declare: bool = True) -> BatchResult:
        """Publisher.send_many into memory: every item is taken (no broker to refuse one), ids in input order."""
        return BatchResult([self.send(i[0], i[1], i[2] if len(i) > 2 else None, declare=declare) for i in items], [])

    def send_async(self, task: publisher.TaskLike, args: Any = (), kwargs: dict[str, Any] | None = None,
                   delay: float | None = None, message_id: str | None = None, declare: bool = True,
                   priority: int | None = None) -> Awaitable[str]:
        """Publisher.send_async into memory: a future of the running loop, already done with the message id."""
        future: asyncio.Future[str] = asyncio.get_running_loop().create_future()
        future.set_result(self.send(task, args, kwargs, delay, message_id, declare, priority))
        return future

    def close(self) -> None:
        """magne.publisher.configure() closes the default publisher: nothing to close here."""

    def _enqueue(self, d: Delivery, due: float) -> None:
        """Under the lock: to a pool thread now if it is due and threads run, else onto the simulated clock."""
        if self.threads and due <= self.clock and self._dispatched < self._budget and not self._stop.is_set():
            held = self.simulated.admit(d.queue, self.clock) if self.simulated else None  # a fleet-wide limit
            if held is None:
                self._dispatched += 1
                self._inflight += 1
                return self._work.put(d)
            due = held
        heapq.heappush(self._due, (due, d.tag, d))

    def _report(self, d: Delivery) -> None:
        """A delivery with its outcome, from a pool thread (or join() when synchronous); a retry is queued again."""
        try:
            assert self.pool is not None
            if d.reason == "not due":  # a foreign message's eta: it waits on the (simulated) broker, no run yet
                with self._cond:
                    self._enqueue(Delivery(next(self._seq), 0, d.queue, d.body, d.copy_header, False),
                                  self.clock + topology.wait_ms(d.delay) / 1000)  # its wait queue's TTL
                return
            f = d.meta if d.meta is not None and d.meta.fmt != "magne" else None  # a foreign message's own fields
            name, args, kwargs = (f.task, f.args, f.kwargs) if f is not None else _decoded(d.body)
            before = wire.read_state(d.header)
            if f is not None:  # a foreign message's own id and retries spent
                before.message_id, before.retries = f.message_id, max(before.retries, f.retries)
            headers, attempts, err = {}, before.history, d.error or {}
            if d.outcome is not Outcome.ACK and d.copy_header:
                headers = {k: v for k, v in (codec.decode_properties(d.copy_header).headers or {}).items()
                           if wire.is_magne_header(k)}
                attempts = wire.read_state(d.copy_header).history
            delay = _seconds(d.delay) if d.outcome is Outcome.RETRY else 0.0
            run = Run(d.task or name or "", args, kwargs, before.message_id, d.queue,
                      _OUTCOMES.get(d.outcome, d.outcome.name), d.reason, err.get("type", ""), err.get("message", ""),
                      err.get("traceback", ""), before.retries, attempts, headers, delay, self.clock,
                      self._exception(d))
            self.flow.settled(d, self.publish)
            with self._cond:
                self._runs.append(run)
                if self.simulated is not None:
                    self.simulated.done(d.queue)
                if d.outcome is Outcome.RETRY:  # the copy the broker routes back once the delay queue's TTL passed
                    self._enqueue(Delivery(next(self._seq), 0, d.queue, d.body, d.copy_header, False), self.clock + delay)
        finally:
            with self._cond:
                if self.threads:
                    self._inflight -= 1
                self._cond.notify_all()

    def join(self, raise_on_failure: bool | None = None) -> None:
        """Run until nothing is queued, running or due, the simulated clock jumping to each next due time; then
        with raise_on_failure (here or on the worker), re-raise the first final failure. TooManyMessages past max_messages."""
        if self.pool is None or self._stop.is_set():
            raise RuntimeError("join() outside the `with worker()` block")
        with self._cond:
            self._budget = self._dispatched + self.max_messages + self._ticks
        while True:
            with self._cond:
                while self._inflight:
                    self._cond.wait()
                if not self._due:
                    break
                if self._dispatched >= self._budget:
                    raise TooManyMessages(
                        f"join() ran {self.max_messages} messages and {len(self._due)} more are due: a task that keeps "
                        "sending itself, or retries without end? Pass worker(max_messages=...) if this is expected")
                self.clock = max(self.clock, self._due[0][0])
                batch: list[Delivery] = []
                while self._due and self._due[0][0] <= self.clock and self._dispatched + len(batch) < self._budget:
                    d = heapq.heappop(self._due)[2]
                    held = None if self.threads else self.simulated.admit(d.queue, self.clock, caps=False)
                    if held is None:
                        batch.append(d)
                    else:
                        heapq.heappush(self._due, (held, d.tag, d))  # a rate limit: later on the simulated clock
                if self.threads:
                    for d in batch:
                        self._enqueue(d, self.clock)
                    batch = []
                else:
                    self._dispatched += len(batch)
            for d in batch:  # synchronous: one after another on this thread, outside the lock (tasks send)
                self._report(self.pool.run_one(d))
        dead = self.dead_letters()
        if dead and (self.raise_on_failure if raise_on_failure is None else raise_on_failure):
            if isinstance(dead[0].exception, Exception):
                raise dead[0].exception
            raise AssertionError(f"task {dead[0].task} was dead-lettered ({dead[0].reason}): {dead[0].error_type}: "
                                 f"{dead[0].error_message}") from dead[0].exception  # a time limit, SystemExit, ...

    def advance(self, seconds: float) -> None:
        """Move the simulated clock on by `seconds`: every periodic task's ticks due meanwhile are sent (with the
        ids and headers a leader gives them, magne.leader) and run, with everything else due, as join() does."""
        assert self.simulated is not None, "advance() outside the `with worker()` block"
        target = self.clock + seconds
        ticks = self.simulated.ticks(self.clock, target)
        for due, task, mid, header, body in ticks:
            with self._cond:
                self._sent.append(Sent(task.name, [], None, mid, task.queue, None, body))
                self._enqueue(Delivery(next(self._seq), 0, task.queue, body, header, False), due)
        self._ticks = len(ticks)
        try:
            self.join()
        finally:
            self._ticks = 0
        self.clock = max(self.clock, target)

    def result_record(self, message_id: str, _timeout: float = 0.0) -> dict[str, Any] | None:
        """magne.result() under test: runs what is due (join), then the message's record, or None."""
        self.join(raise_on_failure=False)
        return self.flow.records.get(message_id)

    # -- inspection -----------------------------------------------------------------------------------
    def _runs_of(self, outcome: str | None, task: Task | str | None) -> list[Run]:
        name = task.name if isinstance(task, Task) else task
        with self._cond:
            return [r for r in self._runs if outcome in (None, r.outcome) and name in (None, r.task)]

    def succeeded(self, task: Task | str | None = None) -> list[Run]:
        return self._runs_of("succeeded", task)

    def dead_letters(self, task: Task | str | None = None) -> list[Run]:
        """Final failures: what production dead-letters to `<queue>.dead`, with reason, error and history."""
        return self._runs_of("dead", task)

    failed = dead_letters

    @property
    def retried(self) -> list[Run]:
        return self._runs_of("retried", None)

    @property
    def runs(self) -> list[Run]:
        return self._runs_of(None, None)

    @property
    def sent(self) -> list[Sent]:
        with self._cond:
            return list(self._sent)

    def assert_ran(self, task: Task | str, /, *args: Any, **kwargs: Any) -> Run:
        """The successful run of `task` with these arguments (compared as decoded from JSON), or AssertionError."""
        for r in self.succeeded(task):
            if r.args == list(args) and r.kwargs == kwargs:
                return r
        seen = [(r.outcome, r.args, r.kwargs) for r in self._runs_of(None, task)]
        raise AssertionError(f"task {getattr(task, 'name', task)} did not succeed with args={list(args)!r} "
                             f"kwargs={kwargs!r}; its runs: {seen!r}")


worker = Worker


def _magne_worker() -> Iterator[Worker]:
    """One testing worker per test, with `magne worker`'s defaults (8 threads)."""
    with Worker() as w:
        yield w


def __getattr__(name: str) -> Any:
    """`magne_worker`, the pytest fixture, made on the first import of that name: only then is pytest imported."""
    if name != "magne_worker":
        raise AttributeError(f"module 'magne.testing' has no attribute {name!r}")
    import pytest

    globals()[name] = fixture = pytest.fixture(name=name)(_magne_worker)
    return fixture
