"""celery's task message, protocol 2 (celery 4.0 and later, its default), with the JSON serializer.

A delivery's properties carry `content_type` (application/json), `correlation_id` (the task id) and headers:
`task` (the task's name), `id`, `eta` and `expires` (ISO 8601), `retries`, `timelimit` ([hard, soft] seconds,
in that order in celery's amqp.as_task_v2), plus others magne does not need (`root_id`, `parent_id`, `group`,
`argsrepr`, `origin`, ...). The body is `[args, kwargs, embed]`, `embed` holding `callbacks`, `errbacks`, `chain`
and `chord`: a message with any of these asks for work after the task that magne does not do, so it is refused.
So are other serializers (pickle, msgpack, yaml: `content_type`) and compressed bodies (the `compression`
header kombu adds). Queues need nothing of their own: celery's `celery` queue is a durable classic queue without
arguments bound to a direct exchange of the same name, which is exactly what magne declares for a task queue.
"""

from __future__ import annotations

import datetime
from typing import Any

from magne import wire
from magne.amqp import codec
from magne.errors import BadMessage
from magne.formats.common import MAX_EPOCH, MAX_ID, MAX_NAME, Foreign, args_kwargs, count, field, seconds, text

KIND = "celery"
JSON = "application/json"
REFUSED_EMBED = {"callbacks": "link callbacks", "errbacks": "link_error callbacks", "chain": "a chain's next tasks",
                 "chord": "a chord's callback"}


def read(body: list[Any], header: bytes, queue: str) -> Foreign:
    """A celery body (already decoded JSON array) and the delivery's content header → Foreign, or BadMessage
    naming the field. Any run thread."""
    try:
        props = codec.decode_properties(header)
    except Exception:
        raise BadMessage("celery message: its properties cannot be decoded") from None
    why = _refusal(props)
    if why:
        raise BadMessage(why)
    headers = props.headers if isinstance(props.headers, dict) else {}
    name = text(KIND, "task (header)", headers.get("task"), MAX_NAME)
    assert name is not None
    mid = text(KIND, "id (header)", headers.get("id"), MAX_ID, required=False)
    if mid is None and isinstance(props.correlation_id, str) and props.correlation_id:
        mid = props.correlation_id[:MAX_ID]
    if len(body) not in (2, 3):
        raise field(KIND, "body", f"array of {len(body)} items", "[args, kwargs, embed]")
    args, kwargs = args_kwargs(KIND, body[0], body[1], "body[0] (args)", "body[1] (kwargs)")
    embed = body[2] if len(body) == 3 else None
    if embed is not None:
        if type(embed) is not dict:
            raise field(KIND, "body[2] (embed)", embed, "a JSON object")
        for key, what in REFUSED_EMBED.items():
            if embed.get(key):
                raise BadMessage(f"celery field 'embed.{key}' asks for {what}, which magne does not run: refused "
                                 "rather than half-done (run it on a celery worker, or send the task on its own)")
    hard, soft = _timelimit(headers.get("timelimit"))
    eta = _when("eta", headers.get("eta"))
    if eta is not None and eta >= MAX_EPOCH:
        raise field(KIND, "eta (header)", headers.get("eta"), "a date and time before the year 2242")
    limits = [s for s in (hard, soft) if s is not None]
    return Foreign(KIND, name, args, kwargs, mid, count(KIND, "retries (header)", headers.get("retries")),
                   eta, min(limits) if limits else None, _when("expires", headers.get("expires")), queue)


def name_of(header: bytes) -> str | None:
    """The task a celery message names (header `task`), for the log line and dead letter of a message refused before
    it was read (a serializer, compression, a callback). Cold path; None if there is no such string."""
    try:
        name = codec.decode_properties(header).headers.get("task")
    except Exception:
        return None
    return name if type(name) is str and 0 < len(name) <= MAX_NAME else None


def refusal(header: bytes) -> str | None:
    """Why a body magne could not read is a celery message it refuses (a serializer, compression), or None. Cold
    path: only for a body that is not plain JSON, in a worker that accepts celery."""
    try:
        return _refusal(codec.decode_properties(header))
    except Exception:
        return None


def _refusal(props: Any) -> str | None:
    ctype = props.content_type
    if ctype not in (None, "", JSON):
        return (f"celery property 'content_type' is {text_of(ctype)}: magne reads the JSON serializer only (no "
                "pickle, msgpack or yaml); set task_serializer='json' on the producers")
    enc = props.content_encoding
    if enc is not None and (type(enc) is not str or enc.strip().lower() not in wire.PLAIN_ENCODINGS):
        return (f"celery property 'content_encoding' is {text_of(enc)}: magne reads plain UTF-8 JSON bodies; set "
                "task_serializer='json' on the producers")
    headers = props.headers if isinstance(props.headers, dict) else {}
    if headers.get("compression") is not None:
        return (f"celery header 'compression' is {text_of(headers['compression'])}: compressed bodies are not "
                "supported; publish without task_compression")
    return None


def text_of(value: Any) -> str:
    return repr(value)[:60]


def _timelimit(value: Any) -> tuple[float | None, float | None]:
    """celery's `timelimit` header: [hard, soft], each seconds or null. magne's one limit is the shorter of the two
    (usually the soft one: it interrupts the task, as celery's soft limit raises in it; a hard limit under the soft
    one would have killed the task first on celery)."""
    if value is None:
        return None, None
    if type(value) not in (list, tuple) or len(value) != 2:
        raise field(KIND, "timelimit (header)", value, "[hard, soft], each seconds or null")
    return seconds(KIND, "timelimit[0] (hard)", value[0]), seconds(KIND, "timelimit[1] (soft)", value[1])


def _when(name: str, value: Any) -> float | None:
    """An ISO 8601 time (celery writes its eta and expires so; naive means UTC) → seconds since the epoch."""
    if value is None:
        return None
    if type(value) is not str or len(value) > 64:
        raise field(KIND, f"{name} (header)", value, "an ISO 8601 date and time")
    try:
        when = datetime.datetime.fromisoformat(value)
        if when.tzinfo is None:
            when = when.replace(tzinfo=datetime.UTC)
        epoch = when.timestamp()
    except (ValueError, OverflowError, OSError):
        raise field(KIND, f"{name} (header)", value, "an ISO 8601 date and time") from None
    return min(epoch, float(MAX_EPOCH))
