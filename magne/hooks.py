"""Hooks: observe and extend a task's lifecycle without forking the worker.

Subclass `Hook`, override the methods you need, and register an instance with
`magne.hooks.add(...)` in the module the worker imports (your task module), so it is
registered before the worker starts:

    from magne import hooks

    class SlowTasks(hooks.Hook):
        def after_success(self, run: hooks.TaskRun) -> None:
            if run.duration > 5:
                log.warning("task %s (message %s) took %.1fs", run.task_name, run.message_id, run.duration)

    hooks.add(SlowTasks())

Where each method runs, and why there:
- `before_task`, `after_run`, `after_success`, `after_failure`, `on_dead_letter`: on the pool
  thread that runs the task ("hooks run where the task runs": user code runs there anyway, so a
  hook can take the locks task code takes). For an `async def` task they run on a small pool of
  hook threads beside the event loop (magne.asyncrun), never on the loop itself, where a slow
  hook would stall every coroutine. They run outside the task's time limit: the watchdog
  raises its interrupt only while the task's own code runs, so an interrupt can never land
  inside a hook (and, say, leave a lock held that the hook took). The after-hooks run before
  the outcome goes back to the I/O thread: a slow hook delays that message's ack, never
  another's. Keep them short.
- `on_worker_start`, `on_worker_stop`: on the worker process's main thread, before the pool
  starts and after it stopped (not while the watchdog runs).
- `before_send`: on the thread that calls `task.send()`, `send_many()` or `send_async()`
  (an event loop's thread for the last), before the message is encoded for the broker; it
  may add application headers (`message.headers`), which the message and every retry and
  dead-letter copy of it carry.

An exception in a hook is logged (at most once per hook and method every LOG_EVERY seconds,
with a count) and changes nothing: the task still runs, the message gets the outcome the task
earned, nothing is lost. A hook cannot change a message's outcome; it sees a `TaskRun`, a view
of the run that is valid during the call (keep what you need, not the run: its message
belongs to the I/O thread once the after-hooks returned).

Not seen by hooks: messages the I/O thread decides alone (a body over --max-body-size is
dead-lettered without reaching a pool thread; prefetched messages given back at a stop), and
the message of a run the watchdog abandoned (a thread stuck in C or a system call, a coroutine
that ignored its cancel): the main thread decides its message and runs no user code, and if the
run comes back later no hook sees it either (its message was decided already, it is no
success). `magne.metrics` counts all of them.

magne's own metrics (magne/metrics/tasks.py, `TaskMetrics`) and tracing (magne/tracing.py) are
built on these hooks: both are examples to copy.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from typing import Any

from magne import logs
from magne.delivery import Outcome
from magne.taskrun import TaskRun

__all__ = ["Hook", "Outgoing", "TaskRun", "WorkerInfo", "add", "clear", "registered", "remove"]

log = logs.Log("magne.hooks")

LOG_EVERY = 10.0  # seconds between two log lines about the same failing hook method

EVENTS = ("before_task", "after_run", "after_success", "after_failure", "on_dead_letter", "on_worker_start",
          "on_worker_stop", "before_send")


class Hook:
    """Base class: every method does nothing. Override the ones you need (see the module docstring for threads)."""

    def on_worker_start(self, worker: WorkerInfo) -> None:
        """The worker process is connected and about to start its pool. Main thread."""

    def on_worker_stop(self, worker: WorkerInfo) -> None:
        """The worker process stopped its pool and is about to exit. Main thread."""

    def before_task(self, run: TaskRun) -> None:
        """A registered task is about to run (its message decoded, its arguments known). Pool thread (a hook
        thread for an `async def` task, in the run's own context: what it sets there, the coroutine sees)."""

    def after_run(self, task: str, outcome: str, seconds: float) -> None:
        """Every run of a registered task's code: its name, its outcome ("success", "retry", "dead", "requeue") and
        the seconds the code ran. The cheap hook, for counting and timing: called before after_success /
        after_failure, and a pool whose hooks override only this one builds no TaskRun at all (about 0.3 us a
        message instead of 1 us). magne.metrics.TaskMetrics uses it. Pool thread.

        A hook may also define `bind_thread()`, called once on each pool (or hook) thread as it starts, returning the
        callable to use instead of after_run on that thread, with the thread's own state bound in: per-thread
        state without a lock and without a thread-local lookup per message (TaskMetrics does this)."""

    def after_success(self, run: TaskRun) -> None:
        """The task returned; its message will be acked. `run.duration` is set. Pool thread."""

    def after_failure(self, run: TaskRun) -> None:
        """The task failed, or its message could not run at all (`run.task` is None then: an unknown task, a body
        that is not a task). `run.decision` is "retry", "dead" or "requeue" (a cold stop cut it short);
        `run.exception`, `run.reason`, `run.delay` (a retry's wait) say the rest (an async run a cold stop cut before it
        began is "requeue" too). Pool thread."""

    def on_dead_letter(self, run: TaskRun) -> None:
        """The message is being dead-lettered (after after_failure, with the same run). Pool thread."""

    def before_send(self, message: Outgoing) -> None:
        """A task message is about to be published; add headers to `message.headers`. The sending thread."""


class WorkerInfo:
    """What a worker hook sees of the worker process."""

    __slots__ = ("pid", "node", "queues", "threads", "tasks")

    def __init__(self, pid: int, node: str, queues: list[str], threads: int, tasks: list[str]) -> None:
        self.pid = pid
        self.node = node  # the broker node it consumes from, as safe to log (no password)
        self.queues = queues
        self.threads = threads
        self.tasks = tasks  # registered task names

    def __repr__(self) -> str:
        return f"<worker pid={self.pid} node={self.node} queues={self.queues}>"


class Outgoing:
    """A task message about to be published, as before_send sees it. Set `headers` entries to add them."""

    __slots__ = ("task_name", "queue", "message_id", "headers")

    def __init__(self, task_name: str, queue: str, message_id: str) -> None:
        self.task_name = task_name
        self.queue = queue
        self.message_id = message_id
        self.headers: dict[str, Any] = {}


_DEAD = Outcome.DEAD


# -- the registry -------------------------------------------------------------------------
_hooks: list[Hook] = []
SEND_HOOKS: list[Callable[[Outgoing], None]] = []  # read by magne.publisher on every send: empty, nothing happens


def add(hook: Hook) -> Hook:
    """Register a hook (once; adding it again does nothing). Returns it. Call before the worker starts (at import
    of the task module); a worker takes the hooks registered when it starts."""
    if not isinstance(hook, Hook):
        raise TypeError(f"a hook must be a magne.hooks.Hook, got {type(hook).__name__}")
    if hook not in _hooks:
        _hooks.append(hook)
        _rebuild_send()
    return hook


def remove(hook: Hook) -> None:
    if hook in _hooks:
        _hooks.remove(hook)
        _rebuild_send()


def clear() -> None:
    """Unregister every hook (for tests)."""
    _hooks.clear()
    _rebuild_send()


def registered() -> list[Hook]:
    return list(_hooks)


def _overrides(hook: Hook, name: str) -> bool:
    return getattr(type(hook), name, None) is not getattr(Hook, name)


def _rebuild_send() -> None:
    # Rebuilt in place: magne.publisher holds a reference to this very list.
    SEND_HOOKS[:] = [h.before_send for h in _hooks if _overrides(h, "before_send")]


def send_headers(task_name: str, queue: str, message_id: str) -> dict[str, Any]:
    """Run the before_send hooks for one message; the headers they added. The sending thread (magne.publisher)."""
    msg = Outgoing(task_name, queue, message_id)
    for fn in SEND_HOOKS:
        _call(fn, msg)
    return msg.headers


# -- calling hooks ----------------------------------------------------------------------------
_failures: dict[Any, list[float]] = {}  # (hook method) -> [count, last logged at]; benign races (a log line more or less)


def _call(fn: Callable[[Any], None], arg: Any) -> None:
    """Call one hook method; contain whatever it raises (logged, rate-limited). Any thread; takes no lock."""
    try:
        fn(arg)
    except BaseException as exc:  # noqa: B036 - a hook can never change an outcome nor end a thread
        _report(fn, exc)


def _report(fn: Callable[[Any], None], exc: BaseException) -> None:
    try:
        key = getattr(fn, "__func__", fn)
        entry = _failures.setdefault(key, [0, 0.0])
        entry[0] += 1
        now = time.monotonic()
        if entry[1] == 0.0 or now - entry[1] >= LOG_EVERY:
            entry[1] = now
            owner = getattr(fn, "__self__", None)
            name = f"{type(owner).__name__}.{getattr(fn, '__name__', '?')}" if owner is not None else repr(fn)
            log.error("hook %s raised %s: %s (%d failures so far; the message's outcome is unchanged)", name,
                      type(exc).__name__, logs.clean(str(exc), 300), entry[0], event="hook_failed")
    except BaseException:  # noqa: B036 - reporting must not raise either
        pass


class HookSet:
    """The hooks a pool (or worker) calls, split by method once, so that a method nobody overrides costs nothing.

    Built by the worker's main thread; its methods are called by pool threads (task hooks) and the main
    thread (worker hooks), and never raise.
    """

    __slots__ = ("before", "run", "success", "failure", "dead", "start", "stop", "full", "_run_hooks")

    def __init__(self, hooks: Iterable[Hook]) -> None:
        hooks = list(hooks)

        def bound(name: str) -> tuple[Callable[[Any], None], ...]:
            return tuple(getattr(h, name) for h in hooks if _overrides(h, name))

        self.before = bound("before_task")
        self.run = bound("after_run")
        self._run_hooks = [h for h in hooks if _overrides(h, "after_run")]
        self.success = bound("after_success")
        self.failure = bound("after_failure")
        self.dead = bound("on_dead_letter")
        self.start = bound("on_worker_start")
        self.stop = bound("on_worker_stop")
        self.full = bool(self.before or self.success or self.failure or self.dead)  # whether runs need a TaskRun

    def __bool__(self) -> bool:
        """Whether a pool must call hooks around its tasks at all (else it keeps its plain path)."""
        return bool(self.full or self.run)

    def thread_timers(self) -> tuple[Callable[[str, str, float], None], ...]:
        """The after_run callables for the calling pool thread, once per thread: a hook may offer
        `bind_thread()`, returning a callable with that thread's own state bound in (magne's TaskMetrics does:
        no thread-local lookup per message), else its after_run method is used. Pool thread, at its start."""
        out = []
        for h in self._run_hooks:
            bind = getattr(h, "bind_thread", None)
            fn = None
            if bind is not None:
                try:
                    fn = bind()
                except Exception as exc:
                    _report(bind, exc)
            out.append(fn or h.after_run)
        return tuple(out)

    def after_run(self, task: str, outcome: str, seconds: float) -> None:
        for fn in self.run:
            try:
                fn(task, outcome, seconds)  # type: ignore[call-arg]
            except BaseException as exc:  # noqa: B036 - as in _call
                _report(fn, exc)

    def before_task(self, run: TaskRun) -> None:
        for fn in self.before:
            _call(fn, run)

    def after_success(self, run: TaskRun) -> None:
        for fn in self.success:
            _call(fn, run)

    def after_failure(self, run: TaskRun) -> None:
        for fn in self.failure:
            _call(fn, run)
        if self.dead and run._d.outcome is _DEAD:
            for fn in self.dead:
                _call(fn, run)

    def worker_start(self, info: WorkerInfo) -> None:
        for fn in self.start:
            _call(fn, info)

    def worker_stop(self, info: WorkerInfo) -> None:
        for fn in self.stop:
            _call(fn, info)
