"""TaskRun: one run of a message as lifecycle hooks (magne.hooks) see it, and the names of its decisions.

Its own module so that the task-run protocol (magne.runner) and the hooks' registry (magne.hooks) both use it
without importing each other or the task registry: a run knows its task only through `TaskLike`.
"""

from __future__ import annotations

from typing import Any, Protocol

from pamqp import commands

from magne import logs, wire
from magne.amqp.codec import decode_properties
from magne.delivery import Delivery, Outcome


class TaskLike(Protocol):
    """What a TaskRun reads of a registered task (magne.registry.Task, not imported here: no import circle)."""

    name: str


DECISIONS = {Outcome.ACK: "success", Outcome.RETRY: "retry", Outcome.DEAD: "dead", Outcome.REQUEUE: "requeue",
             Outcome.GIVE_BACK: "requeue"}
_RETRY = Outcome.RETRY


class TaskRun:
    """One run of a message, as hooks see it. Made by the thread that runs the task (a pool thread,
    or for an `async def` task a hook thread of magne.asyncrun); valid during the hook calls.

    `task` is the registered Task (None when the message names no registered task); `task_name`
    its name, or what the message claimed (escaped, cut), or "" if the body could not be read.
    `headers`, `message_id`, `retries` are decoded from the message's properties on first use
    (about 10 us), so hooks that do not read them do not pay for them.
    """

    __slots__ = ("task", "task_name", "args", "kwargs", "started", "duration", "exception", "_d", "_state", "_props")

    def __init__(self, task: TaskLike | None, d: Delivery, args: Any, kwargs: Any) -> None:
        self.task = task
        self.task_name = task.name if task is not None else logs.clean(d.task, 100)
        self.args = args
        self.kwargs = kwargs
        self.started = 0.0  # time.monotonic() when the task's code started (0: it never started)
        self.duration = 0.0  # seconds the task's code ran (set before the after-hooks)
        self.exception: BaseException | None = None  # what the task raised (after_failure)
        self._d = d
        self._state: dict[Any, Any] | None = None
        self._props: Any = None

    @property
    def queue(self) -> str:
        return self._d.queue

    @property
    def redelivered(self) -> bool:
        """The broker delivered this message before (to this or another worker) and it was not acked."""
        return self._d.redelivered

    @property
    def decision(self) -> str:
        """"success", or after a failure: "retry", "dead" (dead letter), "requeue" or "cancelled" (magne.cancel)."""
        return "cancelled" if self._d.reason == "cancelled" else DECISIONS[self._d.outcome]

    @property
    def reason(self) -> str:
        """Why it failed: "task raised", "time limit", "wrong arguments", "bad message" ("" on success)."""
        return self._d.reason

    @property
    def delay(self) -> float:
        """A retry's wait on the broker, in seconds (0 unless the decision is "retry")."""
        return self._d.delay if self._d.outcome is _RETRY else 0.0

    @property
    def state(self) -> dict[Any, Any]:
        """A dict for hooks' own per-run state, from before_task to the after-hooks (key it by your hook)."""
        if self._state is None:
            self._state = {}
        return self._state

    def _properties(self) -> Any:
        if self._props is None:
            try:
                self._props = decode_properties(self._d.header)
            except Exception:
                self._props = commands.Basic.Properties()
        return self._props

    @property
    def headers(self) -> dict[str, Any]:
        """The message's application headers (as the publisher set them; magne's x-magne-* included)."""
        h = self._properties().headers
        return h if isinstance(h, dict) else {}

    @property
    def message_id(self) -> str | None:
        foreign = getattr(self._d.meta, "message_id", None)  # a dramatiq or celery message's own id (magne.formats)
        if foreign:
            return foreign
        mid = self._properties().message_id
        return mid if isinstance(mid, str) else None

    @property
    def retries(self) -> int:
        """Retries already made before this run (its x-magne-retries, validated; a foreign message's count too)."""
        return max(wire.read_state(self._d.header).retries, getattr(self._d.meta, "retries", 0))

    def __repr__(self) -> str:
        return f"<run {self.task_name or '?'} queue={self.queue} decision={self.decision}>"
