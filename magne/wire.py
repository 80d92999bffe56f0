"""The wire format in code: the JSON body, and every `x-magne-*` header (docs/wire-format.md is its twin).

Everything a publisher controls arrives here first. The body is decoded with
orjson (the hot path); a body holding an integer orjson would turn into a float
(outside 64 bits) is decoded again with the standard library, so integers stay
exact both ways. magne's own headers are read through `read_state`, one
validating parser: a value of the wrong type, negative or absurdly large is
treated as absent and reported as a warning, and the history is rebuilt from
fields of the types magne writes, so nothing a publisher puts in a header can
reach the worker's arithmetic or make a copy unencodable.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import time
from typing import Any

import orjson
from pamqp import commands

from magne.amqp import codec, properties
from magne.amqp.protocol import DEFAULT_FRAME_MAX
from magne.errors import BadMessage

CONTENT_TYPE = "application/json"
# content-encoding values that mean "no transformation" (kombu and others send utf-8).
PLAIN_ENCODINGS = frozenset({"", "utf-8", "utf8", "identity"})

# -- header names ---------------------------------------------------------------------
PREFIX = "x-magne-"
RETRIES = "x-magne-retries"  # retries already made (int)
HISTORY = "x-magne-history"  # one table per failed attempt
REASON = "x-magne-reason"  # why it was dead-lettered
QUEUE = "x-magne-queue"  # the task queue it came from
TASK = "x-magne-task"
ERROR_TYPE = "x-magne-error-type"
ERROR_MESSAGE = "x-magne-error-message"
ERROR_TRACEBACK = "x-magne-error-traceback"
DROPPED = "x-magne-dropped-headers"  # what was left out so that the copy fits a frame
RESULTS_HEADER = "x-magne-results"  # record the outcome (magne.workflow); kept on copies
FLOW_HEADER = "x-magne-flow"  # what runs after it (magne.workflow); kept on copies
CARRIED = frozenset({RESULTS_HEADER, FLOW_HEADER})

MAX_RETRIES_VALUE = 1_000_000  # a retry count above this is not one magne wrote
HISTORY_KEEP = 20
MESSAGE_CHARS = 4096
TRACEBACK_CHARS = 8192
HISTORY_MESSAGE_CHARS = 512


def is_magne_header(key: str) -> bool:
    return key.startswith(PREFIX)


def _replaced(key: str) -> bool:
    """magne's headers a copy writes anew (those asking for results and workflows stay as they are)."""
    return key.startswith(PREFIX) and key not in CARRIED


def safe_text(value: object, limit: int) -> str:
    """Text for one of our headers from anything (an exception, a task name from a body): never raises,
    and always encodable as UTF-8 (a lone surrogate from a JSON body becomes an escape)."""
    try:
        text = value if isinstance(value, str) else str(value)
    except Exception:  # an exception whose __str__ raises
        text = f"<{type(value).__name__} whose str() failed>"
    return text[:limit].encode("utf-8", "backslashreplace").decode("utf-8")


# -- the body --------------------------------------------------------------------------
def new_id() -> str:
    """Every message id magne makes: 32 hex digits laid out as a UUIDv7 (12 of the send time in milliseconds, the
    version digit 7, 19 random), so that a reader of the results, events or cancels streams (magne.results,
    magne.outcomes) can start at the send time instead of reading back through the whole retention window.
    Cheaper than uuid.uuid4().hex (no UUID object), and never taken for one (a uuid4's 13th digit is 4)."""
    r = os.urandom(10).hex()
    return f"{int(time.time() * 1000):012x}7{r[:3]}{'89ab'[int(r[3], 16) & 3]}{r[4:19]}"  # RFC 9562's variant bits


def encode(task_name: str, args: Any = (), kwargs: dict[str, Any] | None = None, message_id: str | None = None) -> bytes:
    """A task message body. Integers beyond 64 bits are written exactly (the standard library does it)."""
    msg: dict[str, Any] = {"func": task_name, "args": list(args)}
    if kwargs:
        msg["kwargs"] = kwargs
    if message_id:
        msg["id"] = message_id
    try:
        out = orjson.dumps(msg)
        if b"null" in out:  # cheap test first: only then can a NaN have become null
            _check_finite(msg, task_name)
        return out
    except orjson.JSONEncodeError as exc:
        if "64-bit" in str(exc):
            try:
                return json.dumps(msg, separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode()
            except (TypeError, ValueError) as exc2:
                exc = exc2  # type: ignore[assignment]
        raise TypeError(f"arguments of task {task_name!r} are not JSON-serializable: {exc}") from None


def properties_for(message_id: str) -> commands.Basic.Properties:
    return commands.Basic.Properties(
        content_type=CONTENT_TYPE,
        delivery_mode=2,  # persistent: survives a broker restart in a durable queue
        message_id=message_id,
    )


# orjson reads an integer literal that does not fit 64 bits as a float: 20+ digits, or a
# negative of 19 (below -2**63). Bodies with a run of 19 digits (rare) are read by the
# standard library instead. A digit run inside a string, or a 19-digit int that would
# have fit, also matches: that only costs the slower parser, never a wrong value. The
# one-class pattern is the cheapest test found (about 150 ns on a small body).
_LONG_DIGITS = re.compile(rb"\d{19}").search


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"number {text[:40]} is out of range")  # as orjson says for the same body
    return value


def _check_finite(obj: Any, task_name: str) -> None:
    """orjson writes NaN and infinities as null; a task must not get None for them. Raise instead."""
    if isinstance(obj, float):
        if not math.isfinite(obj):
            raise TypeError(f"arguments of task {task_name!r} are not JSON-serializable: {obj!r} is not a JSON number")
    elif isinstance(obj, list | tuple):
        for x in obj:
            _check_finite(x, task_name)
    elif isinstance(obj, dict):
        for x in obj.values():
            _check_finite(x, task_name)


def loads(data: bytes | str) -> Any:
    """JSON → Python with integers exact at any size (orjson, or the standard library when it would not be).

    Raises ValueError (orjson.JSONDecodeError is one) for what is not JSON."""
    raw = data.encode() if isinstance(data, str) else data
    if _LONG_DIGITS(raw):
        return json.loads(raw.decode("utf-8"), parse_constant=_reject_constant, parse_float=_finite_float)
    return orjson.loads(raw)


def decode(body: bytes) -> tuple[str, list[Any], dict[str, Any]]:
    """Body → (task name, args, kwargs), or BadMessage saying what is wrong. Called on pool threads."""
    try:
        msg = loads(body)
    except (ValueError, RecursionError) as exc:
        raise BadMessage(f"body is not JSON: {exc}") from None
    return from_object(msg)


def from_object(msg: Any) -> tuple[str, list[Any], dict[str, Any]]:
    """A decoded body → (task name, args, kwargs), or BadMessage (decode, and magne.formats for a worker that
    accepts other formats too). Pool threads."""
    if type(msg) is not dict:
        raise BadMessage(f"body is JSON {type(msg).__name__}, not an object")
    func = msg.get("func")
    if type(func) is not str:
        raise BadMessage("body has no string field 'func' naming the task")
    args = msg.get("args")
    if args is None:
        args = []
    elif type(args) is not list:
        raise BadMessage(f"'args' must be a JSON array, got {type(args).__name__}")
    kwargs = msg.get("kwargs")
    if kwargs is None:
        kwargs = {}
    elif type(kwargs) is not dict:
        raise BadMessage(f"'kwargs' must be a JSON object, got {type(kwargs).__name__}")
    return func, args, kwargs


def check_encoding(header_payload: bytes) -> None:
    """BadMessage if the properties name a content-encoding (gzip, ...) that magne does not undo.

    The flag test is one byte (content-encoding is bit 14 of the first flag word); only
    a message that has the property pays for decoding it.
    """
    if len(header_payload) > 12 and header_payload[12] & 0x40:
        try:
            enc = (codec.decode_properties(header_payload).content_encoding or "").strip().lower()
        except Exception:
            raise BadMessage("unreadable message properties") from None
        if enc not in PLAIN_ENCODINGS:
            raise BadMessage(f"content-encoding {enc[:40]!r} is not supported: magne reads plain UTF-8 JSON bodies")


# -- magne's headers -----------------------------------------------------------------------
@dataclasses.dataclass
class State:
    """What a message's headers say about its earlier attempts, validated."""

    retries: int = 0
    history: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    warnings: list[str] = dataclasses.field(default_factory=list)
    message_id: str | None = None


def _history_entry(e: Any) -> dict[str, Any] | None:
    """One history table as magne writes it, or None."""
    if not isinstance(e, dict):
        return None
    attempt, reason, etype, emsg, at = (e.get(k) for k in ("attempt", "reason", "error-type", "error-message", "at"))
    if not (type(attempt) is int and 0 < attempt <= MAX_RETRIES_VALUE + 1 and type(at) is int and 0 <= at < 2**40):
        return None
    if not (isinstance(reason, str) and isinstance(etype, str) and isinstance(emsg, str)):
        return None
    if len(reason) > 64 or len(etype) > 200 or len(emsg) > HISTORY_MESSAGE_CHARS:
        return None  # longer than anything magne writes
    return {"attempt": attempt, "reason": reason, "error-type": etype, "error-message": emsg, "at": at}


def read_state(header_payload: bytes) -> State:
    """Validated retry count and history from a message's properties. Never raises."""
    st = State()
    try:
        props = codec.decode_properties(header_payload)
    except Exception:
        st.warnings.append("its properties cannot be decoded; treating it as a first attempt")
        return st
    st.message_id = props.message_id if isinstance(props.message_id, str) else None
    headers = props.headers if isinstance(props.headers, dict) else {}
    retries = headers.get(RETRIES)
    if retries is not None:
        if type(retries) is int and 0 <= retries <= MAX_RETRIES_VALUE:
            st.retries = retries
        else:
            st.warnings.append(f"header {RETRIES} holds {safe_repr(retries)}, not a retry count magne wrote; "
                               "treating it as absent")
    history = headers.get(HISTORY)
    if history is not None:
        if not isinstance(history, list):
            st.warnings.append(f"header {HISTORY} holds {safe_repr(history)}, not a list of attempts; ignoring it")
        else:
            considered = history[-HISTORY_KEEP:]
            st.history = [h for h in (_history_entry(e) for e in considered) if h is not None]
            if len(st.history) != len(considered):
                st.warnings.append(f"header {HISTORY} had {len(considered) - len(st.history)} malformed entries; "
                                   "they were dropped")
    return st


def safe_repr(value: Any, limit: int = 60) -> str:
    """A short, escaped rendering of a publisher's value for a log line."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


# -- copies -----------------------------------------------------------------------------------
def copy_header(original: bytes, add: dict[str, Any], frame_max: int) -> bytes:
    """The content header of a retry or dead-letter copy, guaranteed to fit `frame_max`.

    The original's properties and headers are kept bit-exact (minus its old x-magne-*
    entries), magne's `add` appended. If that does not fit: the traceback and history
    are trimmed; if it still does not: the publisher's headers are left out and
    DROPPED says how many. If the original cannot even be walked, only magne's
    headers and delivery mode 2 are written.
    """
    budget = (frame_max or DEFAULT_FRAME_MAX) - codec.FRAME_OVERHEAD
    try:
        payload = properties.splice(original, add, _replaced)
        if len(payload) <= budget:
            return payload
        add = _trimmed(add)
        payload = properties.splice(original, add, _replaced)
        if len(payload) <= budget:
            return payload
        _size, raw = properties.split(original)
        entries = properties.table_entries(raw["headers"]) if "headers" in raw else []
        names = ", ".join(clean_name(k) for k, _e in entries if not is_magne_header(k))
        note = (f"{len(entries)} publisher headers ({len(raw.get('headers', b''))} bytes) left out so that the copy "
                f"fits frame_max {frame_max}: {names}")[:1000]
        payload = properties.splice(original, {**add, DROPPED: note}, is_magne_header, keep_user_headers=False)
        if len(payload) <= budget:
            return payload
        body_size = properties.split(original)[0]
    except Exception:  # unreadable original, or a value of ours pamqp cannot write: keep what surely encodes
        body_size = int.from_bytes(original[4:12], "big") if len(original) >= 12 else 0
        add = {**_trimmed(add), DROPPED: "the original properties could not be read or kept"}
    # Last resort: nothing of the original's properties, magne's headers trimmed hard.
    minimal = {k: (safe_text(v, 200) if isinstance(v, str) else v) for k, v in add.items() if k != HISTORY}
    return codec.header_payload(commands.Basic.Properties(delivery_mode=2, headers=minimal), body_size)


def clean_name(key: str) -> str:
    """A header name from a publisher, shown in a header of ours: printable and short."""
    return "".join(c if c.isprintable() else "?" for c in key[:60])


def _trimmed(add: dict[str, Any]) -> dict[str, Any]:
    out = dict(add)
    if isinstance(out.get(ERROR_TRACEBACK), str):
        out[ERROR_TRACEBACK] = out[ERROR_TRACEBACK][-1024:]
    if isinstance(out.get(ERROR_MESSAGE), str):
        out[ERROR_MESSAGE] = out[ERROR_MESSAGE][:512]
    if isinstance(out.get(HISTORY), list):
        out[HISTORY] = out[HISTORY][-3:]
    return out
