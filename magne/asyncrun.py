"""One `async def` run on the event loop: its clock, the stepping that lets the watchdog reach it, and the threads
that run its hooks.

- `Run`: a run's state (magne.timelimits.Clock: its clock starts at its first step, so a run the loop took but could
  not start yet, because another coroutine holds the loop, has used none of its time).
- `Stepped`: drives the task's coroutine one step at a time under the loop thread's Guard, so that the watchdog
  knows which run the loop is inside and can raise into that run's step only.
- `HookThreads`: the lifecycle hooks of async runs (magne.hooks) run here, never on the loop: a slow hook would stall
  every coroutine, and the hooks promise that a slow hook delays only its own message. Made only when a hook is
  registered: without hooks an async run pays nothing for them.
"""

from __future__ import annotations

import asyncio
import contextvars
import threading
from collections.abc import Callable, Coroutine, Generator
from queue import SimpleQueue
from typing import Any

from magne import logs
from magne.delivery import Delivery
from magne.hooks import HookSet
from magne.registry import Task
from magne.timelimits import Clock, Guard

log = logs.Log("magne.asyncrun")

HOOK_THREADS = 8  # at most this many hooks of async runs at once; more wait for a free hook thread


class Run(Clock):
    """One async task run: made and driven by the loop thread, read (and maybe abandoned) by the watchdog.

    `task` is None for a message that names no task (`error` says why): it runs no body, only its failure path."""

    __slots__ = ("d", "task", "args", "kwargs", "atask", "timer", "begun", "error", "ctx", "in_hook")

    def __init__(self, d: Delivery, task: Task | None, args: list[Any], kwargs: dict[str, Any], limit: float,
                 error: BaseException | None = None) -> None:
        super().__init__(limit)
        self.d = d
        self.task = task
        self.args = args
        self.kwargs = kwargs
        self.atask: asyncio.Task[None] | None = None
        self.timer: asyncio.TimerHandle | None = None
        self.begun = False  # its asyncio Task started (AsyncPool._execute); its body may not have yet
        self.error = error
        # The run's own context: its asyncio Task runs in it, and so do its hooks, on a hook thread while the Task
        # waits for them (what before_task sets, e.g. a tracing span made current, the coroutine sees).
        self.ctx = contextvars.Context()
        self.in_hook = False  # its Task waits for a hook (loop thread writes and reads): the Task must not be woken


class Stepped:
    """Awaitable that drives a task's coroutine one step at a time under the loop thread's Guard (magne.timelimits).
    The first step makes the coroutine (binding the arguments: wrong ones fail the run there, as on a pool thread)
    and starts the run's clock; every step is a window in which the watchdog may raise into the run."""

    __slots__ = ("fn", "args", "kwargs", "run", "guard")

    def __init__(self, fn: Callable[..., Coroutine[Any, Any, Any]], args: list[Any], kwargs: dict[str, Any], run: Run,
                 guard: Guard) -> None:
        self.fn, self.args, self.kwargs, self.run, self.guard = fn, args, kwargs, run, guard

    def __await__(self) -> Generator[Any, Any, Any]:
        guard, run = self.guard, self.run
        guard.enter(run)
        try:
            coro = self.fn(*self.args, **self.kwargs)
        except BaseException:
            guard.leave()
            raise
        send, throw = coro.send, coro.throw
        value: Any = None
        error: BaseException | None = None
        while True:
            try:
                guard.enter(run)
                yielded = send(value) if error is None else throw(error)
            except StopIteration as stop:
                guard.leave()
                return stop.value
            except BaseException:
                guard.leave()
                raise
            guard.leave()
            try:
                value, error = (yield yielded), None
            except BaseException as exc:  # noqa: B036 - a cancel (or anything) thrown in: pass it to the coroutine
                value, error = None, exc


Job = Callable[[tuple[Callable[[str, str, float], None], ...]], Any]


class HookThreads:
    """A few daemon threads that run the hooks of async runs, each with its own after_run timers
    (HookSet.thread_timers, as a pool thread has). Started on first use, by the loop thread."""

    def __init__(self, hooks: HookSet, size: int = HOOK_THREADS) -> None:
        self.hooks = hooks
        self.size = size
        self.jobs: SimpleQueue[tuple[asyncio.AbstractEventLoop, asyncio.Future[Any], Job, Run] | None] = SimpleQueue()
        self.threads: list[threading.Thread] = []

    async def call(self, run: Run, job: Job) -> Any:
        """Loop thread, in `run`'s Task: run `job(timers)` on a hook thread, in the run's context, and wait for it.

        While it waits, the Task must not be woken (it would enter the context the hook thread is inside: asyncio
        cannot, and the Task would never finish): `run.in_hook` tells AsyncPool not to cancel it then (a cold stop
        is seen once the hook returned); a cancel that comes anyway is waited through, since what follows a hook
        (the task's body, or the outcome's report) must wait for it."""
        loop = asyncio.get_running_loop()
        if not self.threads:
            for i in range(self.size):
                t = threading.Thread(target=self._main, name=f"magne-hooks-{i + 1}", daemon=True)
                t.start()
                self.threads.append(t)
        fut: asyncio.Future[Any] = loop.create_future()
        run.in_hook = True
        self.jobs.put((loop, fut, job, run))
        try:
            while True:
                try:
                    return await asyncio.shield(fut)
                except asyncio.CancelledError:
                    if fut.cancelled():  # the loop is winding down (its stop): nothing waits for the hook any more
                        raise
                    continue
        finally:
            run.in_hook = False

    def stop(self) -> None:
        """Main thread, at the worker's stop: let the threads end once their queued hooks ran."""
        for _ in self.threads:
            self.jobs.put(None)

    def _main(self) -> None:
        timers = self.hooks.thread_timers()
        while True:
            item = self.jobs.get()
            if item is None:
                return
            loop, fut, job, run = item
            result: Any = None
            error: BaseException | None = None
            try:
                result = run.ctx.run(job, timers)
            except BaseException as exc:  # noqa: B036 - the runner's hook calls contain hooks' errors; this is magne's
                error = exc
            try:
                loop.call_soon_threadsafe(_settle, fut, result, error)
            except RuntimeError:  # the loop is closed: the worker is stopping, nobody waits for this outcome
                log.warning("a hook finished after the event loop closed; its run's outcome was settled without it")


def _settle(fut: asyncio.Future[Any], result: Any, error: BaseException | None) -> None:
    if fut.done():
        return
    if error is not None:
        fut.set_exception(error)
    else:
        fut.set_result(result)
