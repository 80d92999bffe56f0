"""Messages of other task queues (dramatiq, celery) run as magne tasks: `magne worker --accept dramatiq,celery`.

A team moving to magne keeps its producers: the worker reads their messages as they are. Each foreign format has
one validating parser (magne.formats.dramatiq, magne.formats.celery), like `wire.read_state` for magne's headers:
it turns a delivery into a `Foreign` (task name, args, kwargs, message id, retries spent, eta, time limit, expiry)
or raises BadMessage with a reason that names the field. Nothing a producer wrote reaches the worker unchecked.

Detection costs magne-format messages nothing: a worker without --accept never comes here (Runner.resolve tests
one attribute), and with it the body is decoded once and a JSON object with "func" goes the usual way. Only then
is the shape looked at: an object with "actor_name" is dramatiq's, an array is celery's (protocol 2).

What the runner and the policy do with a `Foreign` (called on the run's thread):
- eta in the future: `NotDue`, and `defer` sends the message to magne's delay queue of its home queue (the
  broker holds it, never a worker's memory), from where it comes back into the home queue when due;
- expired (celery `expires`): `Expired`, dead-lettered with reason "expired", never run and never lost;
- retries spent count against magne's retry policy (policy.decide takes the larger of them and x-magne-retries);
- a message's time limit shortens its task's for this run (never lengthens it); failures go to `dead_to`
  (dramatiq's `<queue>.XQ`, also for anything else that fails in one of dramatiq's queues: `attach_home`).
"""

from __future__ import annotations

import copy
import dataclasses
import math
import time
from collections.abc import Callable
from typing import Any

from magne import logs, topology, wire
from magne.amqp import codec
from magne.amqp.protocol import DEFAULT_FRAME_MAX
from magne.delivery import Delivery, Outcome
from magne.errors import BadMessage
from magne.formats import celery, dramatiq
from magne.formats.common import MAX_NAME, Foreign
from magne.registry import Task

FORMATS = ("dramatiq", "celery")

__all__ = ["FORMATS", "Accept", "Expired", "Foreign", "NotDue", "defer", "parse_accept", "resolve"]


class NotDue(Exception):  # noqa: N818 - a state, not an error: the message waits on the broker
    """The message's eta is in the future: it waits in a delay queue (`defer`), it does not run now."""

    def __init__(self, seconds: float) -> None:
        super().__init__(f"not due for {seconds:.3f}s")
        self.seconds = seconds


class Expired(BadMessage):
    """The message expired before it could run (celery `expires`): dead-lettered with reason "expired"."""

    reason = "expired"


@dataclasses.dataclass(frozen=True)
class Accept:
    """What a worker accepts besides magne's own format, and which of its queues are dramatiq's."""

    formats: frozenset[str] = frozenset()
    dramatiq_queues: frozenset[str] = frozenset()
    clock: Callable[[], float] = time.time  # what "now" is for an eta or expiry (magne.testing: its simulated clock)

    def __bool__(self) -> bool:
        return bool(self.formats)


def parse_accept(text: str | list[str] | None) -> frozenset[str]:
    """`--accept dramatiq,celery` (repeatable) → the formats; ValueError naming an unknown one. Main thread."""
    items = [text] if isinstance(text, str) else list(text or [])
    out = {f.strip().lower() for item in items for f in item.split(",") if f.strip()}
    out.discard("magne")  # always accepted
    unknown = sorted(out - set(FORMATS))
    if unknown:
        raise ValueError(f"--accept: unknown format(s) {', '.join(unknown)}; use one or more of magne, "
                         f"{', '.join(FORMATS)} separated by commas")
    return frozenset(out)


def resolve(d: Delivery, tasks: dict[str, Task], accept: Accept, time_limit: float = 600.0
            ) -> tuple[Task, list[Any], dict[str, Any]]:
    """Runner.resolve for a worker that accepts foreign formats (any run thread): the task, args and kwargs.
    `time_limit`: the worker's default; a message's own limit may shorten its task's, never lengthen it (the
    consumer timeout the worker asks of the broker follows the tasks' limits).

    Raises BadMessage (refused: the reason names the field), Expired, or NotDue. Sets d.task and, for a foreign
    message, d.meta."""
    return _resolve(d, tasks, accept, time_limit)


def attach_home(d: Delivery, accept: Accept) -> None:
    """Before deciding a failure (Runner.fail, cold path): a message with no Foreign of its own (magne's format, or
    a body that could not be read) in one of dramatiq's queues is dead-lettered to its .XQ too, and retried into
    the queue itself rather than into .DQ."""
    home = dramatiq.home_of(d.queue)
    if d.meta is None and home in accept.dramatiq_queues:
        d.meta = _dead_target(Foreign("magne", d.task, [], {}, None, 0, None, None, None, home), accept)


def _dead_target(f: Foreign, accept: Accept) -> Foreign:
    """Failures of a message in dramatiq's queue (whatever its format) go to its .XQ, elsewhere to magne's .dead."""
    if f.home in accept.dramatiq_queues:
        f.dead_to, f.dead_declare = dramatiq.xq_name(f.home), dramatiq.xq_declaration(f.home)
    else:
        f.dead_to = f.dead_declare = None
    return f


def _resolve(d: Delivery, tasks: dict[str, Task], accept: Accept, time_limit: float
             ) -> tuple[Task, list[Any], dict[str, Any]]:
    try:
        msg = wire.loads(d.body)
    except (ValueError, RecursionError) as exc:
        why = celery.refusal(d.header) if "celery" in accept.formats else None  # a celery serializer or compression
        if why:
            d.task = celery.name_of(d.header)  # the log line and the dead letter name the task
            raise BadMessage(why) from None
        wire.check_encoding(d.header)  # gzip and the like: that reason first
        raise BadMessage(f"body is not JSON: {exc} (dramatiq's PickleEncoder and celery's pickle, msgpack and yaml "
                         "serializers are not supported: magne reads JSON only)") from None
    if type(msg) is not list or "celery" not in accept.formats:
        wire.check_encoding(d.header)  # (celery.read checks a celery message's encoding with its other properties)
    if type(msg) is dict and "func" in msg:
        name, args, kwargs = wire.from_object(msg)
        f = None
    elif type(msg) is dict and "actor_name" in msg:
        if "dramatiq" not in accept.formats:
            raise BadMessage("body is a dramatiq message (field 'actor_name'); start the worker with --accept dramatiq")
        f = _read(d, msg)
    elif type(msg) is list:
        if "celery" not in accept.formats:
            raise BadMessage("body is a JSON array, as in a celery message; start the worker with --accept celery")
        f = _read(d, msg)
    elif type(msg) is dict and "task" in msg and "id" in msg and "celery" in accept.formats:
        raise BadMessage("body is a celery message of protocol 1 (fields 'task', 'id' in the body); magne reads "
                         "protocol 2, celery's default since 4.0 (task_protocol=2)")
    else:
        name, args, kwargs = wire.from_object(msg)  # raises the usual reason
        f = None
    if f is not None:
        if f.home not in accept.dramatiq_queues:  # `jobs.DQ` that is not dramatiq's: its copies come back to itself
            f.home = d.queue
        d.meta = _dead_target(f, accept)
        name, args, kwargs = f.task, f.args, f.kwargs
    d.task = name
    t = tasks.get(name)
    if t is None:
        kind = f"{f.fmt} {'actor' if f.fmt == 'dramatiq' else 'task'} " if f is not None else "task "
        raise BadMessage(f"unknown {kind}{logs.clean(name, 100)!r}: no task of that name is registered in this worker "
                         "(register it with @task(name=...))")
    if f is None:  # magne's format: as without --accept (a failure in dramatiq's queue: attach_home)
        return t, args, kwargs
    now = accept.clock()
    if f.expires is not None and now >= f.expires:
        raise Expired(f"header 'expires': the message expired {now - f.expires:.1f}s ago, before it could run")
    if f.eta is not None and f.eta > now:  # back when due, or when it expires if that is sooner (dead-lettered then)
        raise NotDue(min(f.eta - now, topology.MAX_DELAY, math.inf if f.expires is None else f.expires - now))
    if f.time_limit is not None and f.time_limit < (t.time_limit or time_limit):
        t = copy.copy(t)  # this run's limit; the registered task keeps its own
        t.time_limit = f.time_limit
    return t, args, kwargs


def _read(d: Delivery, msg: dict[str, Any] | list[Any]) -> Foreign:
    """A dramatiq (object) or celery (array) body through its parser. Whatever a parser raises is a refusal: a bug
    of ours on a forged value must not pass for the task's failure, which is retried. A refused message still names
    its task in the log line and the dead letter."""
    try:
        return dramatiq.read(msg, d.queue) if type(msg) is dict else celery.read(msg, d.header, d.queue)  # type: ignore[arg-type]
    except Exception as exc:
        if type(msg) is dict:
            actor = msg.get("actor_name")
            d.task = actor if type(actor) is str and 0 < len(actor) <= MAX_NAME else None
        else:
            d.task = celery.name_of(d.header)
        if isinstance(exc, BadMessage):
            raise
        kind = "dramatiq" if type(msg) is dict else "celery"
        raise BadMessage(f"{kind} message cannot be read ({type(exc).__name__}: {logs.clean(str(exc), 200)}); "
                         "refused") from None


def defer(d: Delivery, seconds: float, frame_max: int) -> None:
    """A message not due yet: its copy goes to magne's delay queue of its home queue, whose TTL lands it back there
    when due (or a little before: topology.wait_ms, then it waits again for the rest); the original is acked once
    the broker confirmed the copy (magne.io.settle). Run thread, cold path."""
    home = d.meta.home if isinstance(d.meta, Foreign) else d.queue
    ms = topology.wait_ms(seconds)
    d.outcome = Outcome.RETRY
    d.reason = "not due"
    d.error = None
    d.delay = seconds
    d.copy_to = topology.delay_queue(home, ms)
    d.copy_declare = topology.declare_delay(home, ms)
    # The original header as it is (x-magne-retries and history included), unless it cannot fit the link's frames.
    fits = len(d.header) <= (frame_max or DEFAULT_FRAME_MAX) - codec.FRAME_OVERHEAD
    d.copy_header = d.header if fits else wire.copy_header(d.header, {}, frame_max)


def plan(accepted: str | list[str] | None, dramatiq_queues: list[str] | None, queues: list[str]) -> Accept:
    """The worker's Accept from --accept and --dramatiq-queues (main thread); ValueError saying what is wrong.
    With dramatiq accepted, its queues are the named ones, else every queue the worker consumes."""
    fmts = parse_accept(accepted)
    if dramatiq_queues and "dramatiq" not in fmts:
        raise ValueError("--dramatiq-queues needs --accept dramatiq")
    if "dramatiq" not in fmts:
        return Accept(fmts)
    named = list(dict.fromkeys(dramatiq_queues or queues))
    unknown = [q for q in named if q not in queues]
    if unknown:
        raise ValueError(f"--dramatiq-queues: this worker does not consume {', '.join(unknown)} (its queues: "
                         f"{', '.join(queues)})")
    odd = [q for q in named if q.endswith((".DQ", ".XQ"))]
    if odd:
        raise ValueError(f"give dramatiq's queue by its own name, not {', '.join(odd)}: magne consumes its .DQ too")
    return Accept(fmts, frozenset(named))


def dramatiq_setup(accept: Accept, max_priorities: dict[str, int]) -> tuple[list[str], dict[str, list[Any]]]:
    """The delay queues (`<q>.DQ`) to consume besides the dramatiq queues, and the declarations of both, as
    dramatiq's broker makes them (main thread, before the consumer starts)."""
    extra: list[str] = []
    decls: dict[str, list[Any]] = {}
    for q in sorted(accept.dramatiq_queues):
        prio = max_priorities.get(q)
        extra.append(dramatiq.dq_name(q))
        decls[q] = dramatiq.declarations(q, prio)
        decls[dramatiq.dq_name(q)] = dramatiq.dq_declarations(q, prio)
    return extra, decls
