"""The @task decorator and the registry: the only functions a message can reach."""

from __future__ import annotations

import asyncio
import concurrent.futures
import inspect
import time
from collections.abc import Awaitable, Callable, Iterable
from typing import Any, overload

from magne import results, topology, wire, workflow
from magne.errors import RegistryError
from magne.gate import Limit, limit_of
from magne.policy import RetryPolicy
from magne.publisher import BatchResult, Publisher, default_publisher
from magne.schedule import Schedule, ScheduleError, schedule_of
from magne.steps import Step


class Task:
    __slots__ = ("name", "fn", "queue", "time_limit", "retry_options", "queue_type", "priority", "max_priority",
                 "is_async", "blocking", "schedule", "limit", "results", "__wrapped__", "__doc__")

    def __init__(
        self,
        fn: Callable[..., Any],
        name: str,
        queue: str,
        time_limit: float | None = None,
        retry_options: dict[str, Any] | None = None,
        queue_type: str | None = None,
        priority: int | None = None,
        max_priority: int | None = None,
        schedule: Schedule | None = None,
        limit: Limit | None = None,
        results: bool = False,
    ) -> None:
        self.fn = fn
        self.limit = limit  # @task(concurrency=...)/(rate=...): fleet-wide, enforced by the worker's gate (magne.gate)
        self.schedule = schedule  # @task(every=...)/(cron=...): the fleet's leader sends it (magne.leader)
        self.results = results  # its messages ask the worker to record their outcome (magne.results)
        self.name = name
        self.queue = queue
        self.time_limit = time_limit
        self.retry_options = retry_options or {}  # RetryPolicy fields; the rest come from the worker
        self.queue_type = queue_type  # None: the worker's (or publisher's) default
        self.priority = priority  # the AMQP priority of its messages, unless a send says otherwise
        self.max_priority = max_priority  # declares x-max-priority on its (classic) queue; None: no priorities
        # An `async def` task runs on the worker's event loop (magne.asyncpool); where there is none (magne.testing,
        # Pool.run_one) a pool thread runs it to the end with asyncio.run. `blocking` is that call, chosen once here
        # so that the pool's per-message path calls one attribute for either kind.
        self.is_async = is_async_callable(fn)
        self.blocking: Callable[..., Any] = _run_to_end(fn) if self.is_async else fn
        self.__wrapped__ = fn
        self.__doc__ = fn.__doc__

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        """The function itself (for an `async def` task, its coroutine, to await)."""
        return self.fn(*args, **kwargs)

    def __repr__(self) -> str:
        return f"<task {self.name} queue={self.queue}>"

    def send(self, *args: Any, **kwargs: Any) -> str:
        """Publish one run of this task; returns its message id once the broker confirmed it.

        Any thread; many threads sending at once share the process's publisher connection and have their
        confirms in flight together (magne.publisher)."""
        return self.send_with_options(args=args, kwargs=kwargs)

    def send_with_options(
        self,
        args: Any = (),
        kwargs: dict[str, Any] | None = None,
        delay: float | None = None,
        message_id: str | None = None,
        priority: int | None = None,
        results: bool | None = None,
    ) -> str:
        """Publish one run; `delay` (seconds) makes it wait on the broker first; `priority` (0-255) overrides
        the task's; `results` (default: the task's) asks the worker to record its outcome (magne.result(id)).
        Returns the message id."""
        if priority is not None and not 0 <= priority <= 255:
            raise ValueError(f"priority must be 0..255, got {priority}")
        asked = self.results if results is None else results
        headers = {wire.RESULTS_HEADER: True} if asked else None
        if asked and message_id is None:
            message_id = workflow.new_id()  # tells a reader where in the results stream to start
        pub = default_publisher()
        if isinstance(pub, Publisher):
            return pub.send(self, args, kwargs, delay=delay, message_id=message_id, priority=priority, headers=headers)
        # A stand-in default publisher (magne.testing.Worker) takes the generic publish.
        mid = message_id or wire.new_id()
        props = wire.properties_for(mid)
        props.priority = priority if priority is not None else self.priority
        props.headers = headers
        pub.publish(self.queue, wire.encode(self.name, args, kwargs, mid), props, delay=delay,
                    queue_type=self.queue_type)
        return mid

    def call(self, *args: Any, timeout: float = 30.0, **kwargs: Any) -> Any:
        """Send one run asking for its result and wait for it: its return value, TaskFailed if it failed for good,
        ResultTimeout after `timeout` seconds (counted from the send). Any thread but a worker's I/O thread."""
        deadline = time.monotonic() + timeout
        mid = workflow.new_id()
        waiting = results.expect(mid)  # registered before the send: its record cannot pass unseen
        if waiting is None:  # magne.testing
            return results.result(self.send_with_options(args=args, kwargs=kwargs, results=True), timeout)
        try:
            self.send_with_options(args=args, kwargs=kwargs, message_id=mid, results=True)
        except BaseException:
            waiting[0].done(waiting[1], waiting[2])
            raise
        return results.wait(*waiting, deadline, timeout)

    def message(self, *args: Any, **kwargs: Any) -> Step:
        """This task with these arguments, not sent: a step of magne.pipeline or a member of magne.group."""
        return Step(self, args, kwargs)

    def send_many(self, arglists: Iterable[Any]) -> BatchResult:
        """Publish one run per item of `arglists` (each a sequence of positional arguments), pipelined, and wait
        for every confirm. Returns a BatchResult: the message ids in order and exactly which were nacked,
        returned or lost (`.raise_on_failure()` turns a failure into an exception)."""
        pub = default_publisher()
        if isinstance(pub, Publisher):
            return pub.send_many((self, args) for args in arglists)
        return BatchResult([self.send_with_options(args=args) for args in arglists], [])

    def send_async(self, *args: Any, **kwargs: Any) -> Awaitable[str]:
        """`await task.send_async(...)` from an event loop: the message id once confirmed, without blocking
        the loop (the publisher's I/O thread completes the future). Call on the loop's thread."""
        pub = default_publisher()
        if isinstance(pub, Publisher):
            return pub.send_async(self, args, kwargs)
        future: asyncio.Future[str] = asyncio.get_running_loop().create_future()
        future.set_result(self.send_with_options(args=args, kwargs=kwargs))
        return future


def is_async_callable(fn: Callable[..., Any]) -> bool:
    """Whether calling `fn` makes a coroutine: an `async def`, also behind functools.wraps decorators, in a
    functools.partial, or as an object whose __call__ is one."""
    if inspect.iscoroutinefunction(fn) or inspect.iscoroutinefunction(inspect.unwrap(fn)):
        return True
    if inspect.isfunction(fn) or inspect.ismethod(fn) or not callable(fn):
        return False
    return inspect.iscoroutinefunction(type(fn).__call__)


def _run_to_end(fn: Callable[..., Any]) -> Callable[..., Any]:
    """The blocking call of an async task where there is no worker loop (magne.testing, Pool.run_one): asyncio.run
    on the calling thread, or on a thread of its own if the caller is itself inside an event loop (an async test
    using magne.testing's sync mode), where asyncio.run would refuse."""

    def run(*args: Any, **kwargs: Any) -> Any:
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            return asyncio.run(fn(*args, **kwargs))
        with concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="magne-async-call") as ex:
            return ex.submit(asyncio.run, fn(*args, **kwargs)).result()

    return run


REGISTRY: dict[str, Task] = {}


@overload
def task(fn: Callable[..., Any], /) -> Task: ...
@overload
def task(
    *,
    name: str | None = None,
    queue: str | None = None,
    time_limit: float | None = None,
    max_retries: int | None = None,
    min_backoff: float | None = None,
    max_backoff: float | None = None,
    retry_on: tuple[type[BaseException], ...] | None = None,
    queue_type: str | None = None,
    priority: int | None = None,
    max_priority: int | None = None,
    every: float | None = None,
    cron: str | None = None,
    timezone: str | None = None,
    concurrency: int | None = None,
    rate: str | None = None,
    results: bool = False,
) -> Callable[[Callable[..., Any]], Task]: ...


def task(
    fn: Callable[..., Any] | None = None,
    /,
    *,
    name: str | None = None,
    queue: str | None = None,
    time_limit: float | None = None,
    max_retries: int | None = None,
    min_backoff: float | None = None,
    max_backoff: float | None = None,
    retry_on: tuple[type[BaseException], ...] | None = None,
    queue_type: str | None = None,
    priority: int | None = None,
    max_priority: int | None = None,
    every: float | None = None,
    cron: str | None = None,
    timezone: str | None = None,
    concurrency: int | None = None,
    rate: str | None = None,
    results: bool = False,
) -> Any:
    """Register a function as a task: `@task`, or `@task(queue=..., time_limit=..., max_retries=...)`.

    Retry settings left out fall back to the worker's defaults (`magne worker --max-retries ...`).
    `max_priority=N` declares the task's classic queue with x-max-priority N (only when asked: an existing
    queue without it keeps redeclaring); `priority` is the default priority of its messages.
    `every=30` (seconds) or `cron="*/5 * * * *"` (with `timezone=`, UTC by default) make it periodic: one
    worker of the fleet sends it at each due time (docs/schedules.md); it must take no arguments.
    `concurrency=3`: at most 3 runs at once across every worker; `rate="20/s"` (or /m, /h): at most 20 starts
    per second across every worker. Messages over a limit wait; they are never failed or retried for it.
    `results=True`: every message of it asks the worker to record its outcome, for magne.result(message_id)
    (docs/results.md).
    """

    def register(f: Callable[..., Any]) -> Task:
        tname = name if name is not None else getattr(f, "__name__", None) or type(f).__name__  # a partial has none
        if not isinstance(tname, str) or not tname:
            raise RegistryError(f"a task name must be a non-empty string, got {tname!r}")
        tqueue = queue if queue is not None else topology.default_queue(tname)
        why = topology.queue_name_problem(tqueue)
        if why is not None:  # now, at import: not a worker that dies at its first declare (a crash loop)
            origin = "" if queue is not None else " (its task name in upper case; give it queue=...)"
            raise RegistryError(f"task {tname!r}: queue name {str(tqueue)[:60]!r}{origin} {why}")
        if inspect.isasyncgenfunction(f) or inspect.isgeneratorfunction(f):
            # Calling it would only make a generator: the body would never run and the message would be acked.
            raise RegistryError(f"task {tname}: a generator function cannot be a task (its body would never run); "
                                "make it a plain `def` or an `async def`")
        if time_limit is not None and time_limit <= 0:
            raise RegistryError(f"task {tname}: time_limit must be positive, got {time_limit}")
        if queue_type is not None and queue_type not in topology.QUEUE_TYPES:
            raise RegistryError(f"task {tname}: queue_type must be one of {topology.QUEUE_TYPES}")
        for label, value, top in (("priority", priority, 255), ("max_priority", max_priority, 255)):
            if value is not None and not (type(value) is int and 0 <= value <= top and (label == "priority" or value)):
                raise RegistryError(f"task {tname}: {label} must be an int from {0 if label == 'priority' else 1} to {top}")
        if max_priority is not None and queue_type == "quorum":
            raise RegistryError(f"task {tname}: max_priority needs a classic queue (RabbitMQ 3.x quorum queues have no "
                                "priorities)")
        retry_options = {k: v for k, v in (("max_retries", max_retries), ("min_backoff", min_backoff),
                                           ("max_backoff", max_backoff), ("retry_on", retry_on)) if v is not None}
        if "retry_on" in retry_options:
            retry_options["retry_on"] = tuple(retry_options["retry_on"])
        try:  # catch bad values now, at import, not at the first failure
            RetryPolicy(**{**dict(max_backoff=max(RetryPolicy.max_backoff, min_backoff or 0)), **retry_options})
        except ValueError as exc:
            raise RegistryError(f"task {tname}: {exc}") from None
        try:
            sched = schedule_of(tname, every, cron, timezone)
        except ScheduleError as exc:
            raise RegistryError(f"task {tname}: {exc}") from None
        if sched is not None and not _takes_no_arguments(f):
            raise RegistryError(f"task {tname}: a periodic task (every=/cron=) is sent with no arguments, but it "
                                "requires some; give them defaults")
        try:
            limit = limit_of(concurrency, rate)
        except ValueError as exc:
            raise RegistryError(f"task {tname}: {exc}") from None
        t = Task(f, tname, tqueue, time_limit, retry_options, queue_type, priority, max_priority, sched, limit,
                 bool(results))
        old = REGISTRY.get(tname)
        if old is not None and _origin(old.fn) != _origin(f):
            raise RegistryError(
                f"two tasks are named {tname!r}: {'.'.join(_origin(old.fn))} and {'.'.join(_origin(f))}; "
                "give one of them name=..."
            )
        REGISTRY[tname] = t
        return t

    return register(fn) if fn is not None else register


def _takes_no_arguments(f: Callable[..., Any]) -> bool:
    try:
        inspect.signature(f).bind()
    except TypeError:
        return False
    except ValueError:  # no signature to read (a builtin): let the first tick tell
        return True
    return True


def _origin(f: Callable[..., Any]) -> tuple[str, str]:
    """Where a task function was defined: its module and qualified name (a partial's or an object's, its function's
    or its class's)."""
    target = getattr(f, "func", f)  # functools.partial
    if not (inspect.isfunction(target) or inspect.ismethod(target)):
        target = type(target)
    return getattr(target, "__module__", "?"), getattr(target, "__qualname__", "?")


def queues_of(tasks: dict[str, Task]) -> list[str]:
    return sorted({t.queue for t in tasks.values()})
