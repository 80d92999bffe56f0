"""Results and workflows, the worker's half: what a finished message asks to be published before it is acked.

A message asks with two headers (docs/results.md): `x-magne-results` (record my outcome in the results stream) and
`x-magne-flow` (JSON: what runs after me: the rest of a pipeline, the group I belong to). Messages without them
cost the worker one test of a flag bit in the content header (`asks`), on the pool thread.

What a finished message asks for becomes a list of `Next` messages (made here, on the pool thread for a success,
on the I/O thread for a dead letter) that the I/O thread publishes confirmed on the worker's link before it acks
the original (magne/io/follow.py): a crash in between duplicates a result record or a next step, never loses one.

Pure: nothing here touches a socket, a lock or a thread.
"""

from __future__ import annotations

import json
import math
import os
import re
import time
from typing import Any, NamedTuple

import orjson
from pamqp import commands

from magne import topology, wire
from magne.amqp import codec, names
from magne.delivery import Delivery
from magne.engine.message import Prep
from magne.outgoing import json_header

RESULTS = wire.RESULTS_HEADER  # bool: record this message's outcome in the results stream (kept on retry copies)
FLOW = wire.FLOW_HEADER  # JSON text: the rest of its pipeline, its group (see docs/results.md)
_MARK, _RESULTS_B, _FLOW_B = b"x-magne-", RESULTS.encode(), FLOW.encode()


CHORD_GROUP = re.compile(r"[0-9a-f]{32}\.g([0-9]{1,7})")  # a group id as magne.steps makes it (its size in group 1)


class Next(NamedTuple):
    """One message to publish (confirmed) before the original is acked."""

    exchange: str
    routing_key: str
    header: bytes
    body: bytes
    message_id: str
    preps: tuple[Prep, ...]


def stream_declaration() -> tuple[Any, type]:
    return (names.QueueDeclare(queue=STREAM, durable=True,
                               arguments={"x-queue-type": "stream", "x-max-age": MAX_AGE}), commands.Queue.DeclareOk)


def configure(stream: str | None = None, max_age: str | None = None) -> None:
    """Where results live and for how long: the stream's name (MAGNE_RESULTS_STREAM, default magne.results) and
    its x-max-age (MAGNE_RESULTS_MAX_AGE, default 24h: RabbitMQ's units Y M D h m s). Writers and readers must agree
    on the name; the age applies when the stream is first declared (change it later with a policy). Call before
    sending or reading; a worker reads the environment."""
    global STREAM, MAX_AGE, STREAM_PREP
    stream = stream if stream is not None else STREAM
    max_age = max_age if max_age is not None else MAX_AGE
    why = names.name_problem(stream)
    if why is not None:
        raise ValueError(f"results stream name {stream[:60]!r} {why}")
    if not re.fullmatch(r"[1-9][0-9]{0,8}[YMDhms]", max_age):
        raise ValueError(f"results max age must be a RabbitMQ x-max-age like 24h, 7D or 30m, got {max_age[:30]!r}")
    STREAM, MAX_AGE = stream, max_age
    STREAM_PREP = Prep(("results-stream", STREAM, MAX_AGE), [stream_declaration()], what=STREAM)


STREAM, MAX_AGE = "magne.results", "24h"
STREAM_PREP: Prep
configure(os.environ.get("MAGNE_RESULTS_STREAM") or None, os.environ.get("MAGNE_RESULTS_MAX_AGE") or None)


def asks(header: bytes) -> bool:
    """Whether a message asked for its result or belongs to a workflow. Pool and I/O threads, per message: a flag
    bit (the content header has a headers table) and, only then, a search of the header for our prefix."""
    return len(header) > 12 and bool(header[12] & 0x20) and _MARK in header and (_RESULTS_B in header or _FLOW_B in header)


def pipeline_of(d: Delivery) -> str | None:
    """The id of the pipeline a step belongs to (its last step's id, the flow's `pipe`), or None: a cancel of that id
    stops the steps not run yet. Run threads, only while a cancel is known (a search of the header, and a decode of
    it for a message that carries a flow)."""
    if _FLOW_B not in d.header:
        return None
    pipe = _flow(_headers(d)).get("pipe")
    return pipe if isinstance(pipe, str) else None


new_id = wire.new_id  # every magne id carries its send time: a reader of its result starts the stream there


def sent_at_ms(message_id: str) -> int | None:
    """When a message id made by new_id() was made (ms since the epoch), or None for any other id."""
    if not re.fullmatch(r"[0-9a-f]{12}7[0-9a-f]{19}(\.[0-9a-z.]{1,40})?", message_id):  # a group's add a suffix
        return None
    ms = int(message_id[:12], 16)
    now = time.time() * 1000
    return ms if now - 400 * 86_400_000 < ms < now + 86_400_000 else None


def dumps(obj: Any) -> bytes:
    """JSON as task arguments are written (wire.encode's rules): exact big integers, no NaN. TypeError/ValueError."""
    try:
        out = orjson.dumps(obj)
    except orjson.JSONEncodeError as exc:
        if "64-bit" not in str(exc):
            raise TypeError(str(exc)) from None
        return json.dumps(obj, separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode()
    if b"null" in out:  # a NaN or infinity became null: refuse it (a None is the common null, and costs a walk)
        _finite(obj)
    return out


def _finite(obj: Any) -> None:
    if isinstance(obj, float):
        if not math.isfinite(obj):
            raise ValueError(f"{obj!r} is not a JSON number")
    elif isinstance(obj, list | tuple):
        for x in obj:
            _finite(x)
    elif isinstance(obj, dict):
        for x in obj.values():
            _finite(x)


def _headers(d: Delivery) -> dict[str, Any]:
    return _read(d)[0]


def _read(d: Delivery) -> tuple[dict[str, Any], str]:
    """A delivery's headers and message id, decoded once (cold path: only messages that asked)."""
    try:
        props = codec.decode_properties(d.header)
    except Exception:
        return {}, ""
    h, mid = props.headers, props.message_id
    return (h if isinstance(h, dict) else {}), (mid if isinstance(mid, str) else "")


def _flow(headers: dict[str, Any]) -> dict[str, Any]:
    raw = headers.get(FLOW)
    if isinstance(raw, bytes):
        raw = raw.decode("utf-8", "replace")
    if not isinstance(raw, str):
        return {}
    try:
        flow = wire.loads(raw)
    except (ValueError, RecursionError):
        return {}
    return flow if isinstance(flow, dict) else {}


def record(mid: str, task: str, ok: bool, value: Any = None, reason: str = "", error: dict[str, str] | None = None,
           of: str | None = None, extra: dict[str, Any] | None = None) -> Next:
    """A result record for message `mid` (`of`: the message whose outcome it is, when that is another one: a pipeline's
    step or a group's member). The body is JSON; a value that is not becomes a failure record saying so."""
    rec: dict[str, Any] = {"id": mid, "task": wire.safe_text(task, 200), "ok": ok, "at": round(time.time(), 3)}
    if of is not None and of != mid:
        rec["of"] = of
    if extra:
        rec.update(extra)
    if ok:
        rec["value"] = value
        try:
            body = dumps(rec)
        except (TypeError, ValueError, RecursionError) as exc:
            return record(mid, task, False, reason="result not JSON", of=of,
                          error={"type": type(exc).__name__, "message": wire.safe_text(
                              f"the task's return value cannot be sent as JSON: {exc}", wire.MESSAGE_CHARS)})
    else:
        rec["reason"] = reason
        rec["error"] = error or {"type": "Error", "message": reason}
        body = dumps(rec)
    return Next("", STREAM, json_header(mid.encode()[:255].decode("utf-8", "ignore"), len(body)), body, mid,
                (STREAM_PREP,))


def step_message(step: dict[str, Any], extra_args: list[Any], flow: dict[str, Any] | None) -> Next:
    """A task message of a workflow, from its step (made by magne.steps): its arguments plus `extra_args`, asking
    for its result if the step does, carrying `flow` (what runs after it)."""
    check_step(step)
    mid, queue, qtype = step["id"], step["queue"], step.get("qt") or "classic"
    body = wire.encode(step["task"], [*step.get("args", []), *extra_args], step.get("kwargs") or None, mid)
    return Next(queue, queue, header_for(mid, len(body), step.get("results") is True, flow), body, mid,
                (Prep(("declare", queue, qtype, None), topology.declarations(queue, qtype), what=queue),))


def check_step(step: Any) -> None:
    """A step from a header, as Step.spec makes it, or ValueError: a publisher controls the header, and the worker
    must publish only task messages, to task queues (never to an amq.* or malformed name)."""
    if not isinstance(step, dict):
        raise ValueError("a pipeline step in x-magne-flow is not an object")
    task, queue, mid, qtype = step.get("task"), step.get("queue"), step.get("id"), step.get("qt")
    if not (isinstance(task, str) and isinstance(mid, str) and 0 < len(mid) <= 200):
        raise ValueError("a pipeline step in x-magne-flow has no task name or message id")
    why = topology.queue_name_problem(queue)
    if why is not None:
        raise ValueError(f"a pipeline step's queue {wire.safe_repr(queue)} {why}")
    if queue == STREAM or queue.startswith(f"{STREAM}."):  # a forged record in the stream, a second chord callback
        raise ValueError(f"a pipeline step's queue {wire.safe_repr(queue)} is the results stream or a chord's gate")
    if qtype is not None and qtype not in topology.QUEUE_TYPES:
        raise ValueError(f"a pipeline step's queue type {wire.safe_repr(qtype)} is not one of {topology.QUEUE_TYPES}")
    if not isinstance(step.get("args", []), list) or not isinstance(step.get("kwargs") or {}, dict):
        raise ValueError("a pipeline step's args must be a list and its kwargs an object")


def group_messages(spec: dict[str, Any], value: Any) -> list[Next]:
    """A group step's members (made by magne.steps), each with `value` appended, carrying its own flow (its place
    in the group, or its member pipeline's rest). ValueError for a malformed one: a publisher controls the header."""
    group, n, members = spec.get("group"), spec.get("n"), spec.get("members")
    m = CHORD_GROUP.fullmatch(group) if isinstance(group, str) else None
    if m is None or not isinstance(members, list) or not 0 < len(members) == n == int(m.group(1)):
        raise ValueError("a group step in x-magne-flow has no group id of its size, or not that many members")
    out = []
    for member in members:
        flow = member.get("flow") if isinstance(member, dict) else None
        if not isinstance(member, dict) or not isinstance(flow, dict | None):
            raise ValueError("a group step's member in x-magne-flow is not an object with a step and a flow")
        out.append(step_message(member.get("step"), [value], flow))
    return out


def header_for(mid: str, size: int, results: bool, flow: dict[str, Any] | None, priority: int | None = None) -> bytes:
    props = wire.properties_for(mid)
    props.priority = priority
    headers: dict[str, Any] = {}
    if results:
        headers[RESULTS] = True
    if flow:
        headers[FLOW] = dumps(flow).decode()
    props.headers = headers or None
    return codec.header_payload(props, size)


def on_success(d: Delivery, task: str, value: Any) -> None:
    """Pool thread (or the event loop's), after a task that asked (`asks`) succeeded: what to publish before its
    ack goes on `d.follow`. Never raises: a record or step that cannot be made becomes a failure record."""
    headers, mid = _read(d)
    flow = _flow(headers)
    out: list[Next] = []
    why = "workflow"
    try:
        rest = flow.get("rest")
        if isinstance(rest, list) and rest:  # a pipeline goes on: its next step (or group step) gets this value
            if not isinstance(flow.get("pipe"), str) or len(flow["pipe"]) > 255:
                raise ValueError("x-magne-flow names no pipeline id")
            if isinstance(rest[0], dict) and "members" in rest[0]:  # a group step: ends its rest (steps.py's plan)
                if len(rest) > 1:
                    raise ValueError("a group step in x-magne-flow is followed by more steps")
                out.extend(group_messages(rest[0], value))
            else:
                then = flow.get("then") if isinstance(flow.get("then"), dict) else None
                nxt = {"pipe": flow["pipe"], "rest": rest[1:], **({"then": then} if then else {})} if len(rest) > 1 \
                    else then  # a member pipeline's last step carries its place in its group
                out.append(step_message(rest[0], [value], nxt))
        if headers.get(RESULTS) is True:
            if flow and not out:  # a member's value that is not JSON fails its group and pipeline, not only itself
                why = "result not JSON"
                dumps(value)
            out.append(record(mid, task, True, value))
    except Exception as exc:  # a step that cannot be sent (a value that is not JSON): the pipeline's failure
        err = {"type": type(exc).__name__, "message": wire.safe_text(exc, wire.MESSAGE_CHARS)}
        out = [record(i, task, False, reason=why, error=err, of=mid) for i in failed_ids(mid, flow, True)]
    d.follow = out or None


def on_cancelled(d: Delivery, why: str) -> list[Next] | None:
    """The run's thread (or the watchdog), cold path: a message that asked was cancelled (magne.cancels; acked, never
    run again). Its result, its pipeline's and its chord's say so: a failure record with reason "cancelled" (issue
    23: "its result, if it asked for one, says so"), published before the ack like any other follow-up."""
    task = d.task
    if not task:  # cancelled before it was decoded: the record names the task its body names (d.task stays "": it is
        try:      # a metrics label, only ever a registered task's name)
            task = wire.safe_text(wire.decode(d.body)[0], 200)
        except Exception:  # noqa: BLE001 - a body we cannot read still gets its record, without a task name
            pass
    d.error = {"type": "Cancelled", "message": wire.safe_text(why, wire.MESSAGE_CHARS)}
    return on_dead(d, task)


def failed_ids(mid: str, flow: dict[str, Any], asked: bool) -> list[str]:
    """The ids whose result is a message's failure: its own (if it `asked`), its pipeline's, and for a group's member
    (or a member pipeline's step, whose `then` is the member's place) the member's and its chord's."""
    pipe = flow.get("pipe")
    ids = [mid] if asked else []
    if isinstance(pipe, str) and 0 < len(pipe) <= 255:
        ids.append(pipe)
    then = flow.get("then") if isinstance(flow.get("then"), dict) else {}
    for f in (flow, then):
        group = f.get("group")
        if isinstance(group, str) and CHORD_GROUP.fullmatch(group):
            if f is then and type(f.get("i")) is int:
                ids.append(f"{group}.{f['i']}")
            if f.get("gate") == f"{STREAM}.chord.{group}":  # its own group's gate, as magne.chords checks
                ids.append(f"{group}.callback")
    return list(dict.fromkeys(ids))


def on_dead(d: Delivery, task: str | None = None) -> list[Next] | None:
    """I/O thread, cold path: a message that asked was dead-lettered (its failure is final). Its failure record, and
    its pipeline's (the pipeline's result is its first failure). Also a run thread's, for a cancelled message
    (Runner.was_cancelled, with its `error`): its outcome is as final, and whoever waits on it must hear so."""
    headers, mid = _read(d)
    flow = _flow(headers)
    ids = failed_ids(mid, flow, headers.get(RESULTS) is True)
    if not ids:
        return None
    err = d.error or {"type": "BadMessage", "message": d.reason}
    return [record(i, d.task if task is None else task, False, reason=d.reason, error=err, of=mid) for i in ids]

