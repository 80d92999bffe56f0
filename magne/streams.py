"""RabbitMQ streams as magne's memory: the cancel records (magne.cancels) and the task events (magne.events).

A stream is an append-only log kept for a retention age (`x-max-age`), readable from any point in time
(`x-stream-offset` with a timestamp) by any number of readers, each with its own position. That is what a cancel
needs (a worker started after it reads it back) and what a dashboard needs (its history survives its restart),
with nothing but the broker: no database, no Redis.

Everything here rides an engine Client (magne/engine/client.py), normally the process's default Publisher's one:
declaring is a call from the caller's thread; a follower's callback runs on the client's loop thread and must not
block (it parses a small JSON record and updates a dict).
"""

from __future__ import annotations

import datetime
import os
from collections.abc import Callable
from typing import Any

from pamqp import commands

from magne import logs
from magne.amqp import codec, names
from magne.amqp.errors import ChannelClosed, MagneError
from magne.engine.client import Client
from magne.engine.session import Delivered

log = logs.Log("magne.streams")

DAY = 86400.0


def seconds_from_env(var: str, default: float) -> float:
    """A retention in seconds from the environment (MAGNE_CANCEL_RETENTION, MAGNE_EVENTS_RETENTION), else `default`;
    a value that is not a positive number is ignored with a warning (bad input never stops a worker)."""
    raw = os.environ.get(var, "")
    if not raw:
        return default
    try:
        value = float(raw)
        if value > 0 and value == value and value != float("inf"):
            return value
    except ValueError:
        pass
    log.warning("%s=%r is not a positive number of seconds; using %g", var, logs.clean(raw, 40), default)
    return default


def declare(client: Client, name: str, max_age: float, max_bytes: int | None = None) -> None:
    """Declare the stream `name` (durable, `x-max-age`), or use it as it is if it exists with other settings (an
    operator changed its retention by policy or by hand: theirs wins). Any thread but the client's loop thread."""
    args: dict[str, Any] = {"x-queue-type": "stream", "x-max-age": f"{max(1, int(max_age))}s"}
    if max_bytes:
        args["x-max-length-bytes"] = max_bytes
    try:
        client.call(names.QueueDeclare(queue=name, durable=True, arguments=args), commands.Queue.DeclareOk)
    except ChannelClosed as exc:
        if exc.code != 406:
            raise
        client.call(names.QueueDeclare(queue=name, passive=True), commands.Queue.DeclareOk)
        log.info("stream %s exists with other settings than %s; using it as it is", name, args, event="stream_kept")


def mark(client: Client, name: str, body: bytes = b"{}", timeout: float = 5.0, message_id: str | None = None) -> bool:
    """Append one message that is not a record (`body`: what every reader of that stream skips) and wait for its
    confirm, before anyone attaches to the stream by time. A stream that has never held a message resolves a timestamp
    offset to its end as the reader attaches, so a record written during the attach is skipped (seen on RabbitMQ 3.10:
    about one chord in 50 under load never fired, another worker's follower having missed its first members'
    records); one message in the stream first closes that gap. `message_id`: for a reader that looks for this very
    marker (magne.outcomes: where its read ends). False, logged, if refused or late: the reader attaches anyway. Any
    thread but the client's loop thread."""
    props = commands.Basic.Properties(content_type="application/json", delivery_mode=2, message_id=message_id)
    try:
        client.publish_confirmed("", name, body, props, timeout=timeout)
    except MagneError as exc:
        log.info("could not mark stream %s before reading it (%s: %s); reading it anyway", name, type(exc).__name__,
                 logs.clean(str(exc), 200), event="stream_mark_failed")
        return False
    return True


def offset_at(when: float) -> datetime.datetime | str:
    """The `x-stream-offset` that reads a stream from the wall-clock time `when` (an AMQP timestamp; -inf: its first
    record)."""
    if when == float("-inf"):
        return "first"
    return datetime.datetime.fromtimestamp(max(0.0, when), tz=datetime.UTC)


def follow(client: Client, name: str, since: float, on_body: Callable[[bytes], None], prefetch: int = 200,
           **kw: Any) -> str:
    """Read stream `name` from wall-clock time `since` on and keep following it; `on_body(body)` gets each record on
    the client's loop thread (must not block, must not raise: a raise is logged and the record skipped). Returns the
    consumer tag (Client.cancel stops it). The client subscribes again after a reconnect (the
    callback goes on after the last record it saw: each record's `x-stream-offset`). Any thread but the loop's."""

    args: dict[str, Any] = {"x-stream-offset": offset_at(since)}

    def on_message(m: Delivered) -> None:
        try:
            on_body(m.body)
        except Exception as exc:
            log.warning("a record of stream %s could not be read (%s); skipped", name, type(exc).__name__,
                        event="bad_record")
        client.ack(m.tag, m.gen)  # a stream consumer acks to get more credit
        # Resume after this record when the client subscribes again (a reconnect): the subscription keeps this very
        # dict, so a reconnect neither reads the window again nor counts a record twice.
        try:
            offset = (codec.decode_properties(m.header).headers or {}).get("x-stream-offset")
        except Exception:
            offset = None
        if isinstance(offset, int) and not isinstance(offset, bool):
            args["x-stream-offset"] = offset + 1

    return client.consume(name, on_message, prefetch=prefetch, arguments=args, **kw)
