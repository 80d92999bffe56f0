"""Making messages to send: a task run's body and header, the declarations its queue needs, a delay, and what a
batch reports. The sending thread's half of magne.publisher (nothing here touches a connection).

Where the header is made by hand (`json_header`): pamqp takes about 10 us for these properties and a bulk send
makes 20,000 of them; tests/unit/test_publisher_unit.py checks it against pamqp.
"""

from __future__ import annotations

import dataclasses
import math
import struct
from typing import Any, Protocol

from pamqp import commands

from magne import hooks, logs, topology, wire
from magne.amqp import codec, names
from magne.amqp.confirms import Nacked, Returned
from magne.amqp.errors import MagneError, PublishError, as_publish_error
from magne.engine.sender import Prep

log = logs.Log("magne.publisher")

MAX_DELAY = topology.MAX_DELAY  # the longest a message can wait on the broker (32-bit TTL and x-expires, in ms)


class TaskLike(Protocol):
    """What a send needs of a task: a magne.Task, or anything with these attributes (the CLI's target)."""

    name: str
    queue: str
    queue_type: str | None


@dataclasses.dataclass(frozen=True, slots=True)
class Target:
    """A task by name and queue, for sending without importing its module (the CLI)."""

    name: str
    queue: str
    queue_type: str | None = None


@dataclasses.dataclass(frozen=True, slots=True)
class Message:
    """One message for publish_many, with the arguments of Publisher.publish."""

    queue: str
    body: bytes
    properties: commands.Basic.Properties
    exchange: str | None = None
    delay: float | None = None
    queue_type: str | None = None
    declare: bool = True


@dataclasses.dataclass(slots=True)
class Failed:
    """One message of a batch that the broker did not take; `reason` is "nack", "return" or "error"."""

    index: int
    message_id: str
    reason: str
    error: MagneError


@dataclasses.dataclass(slots=True)
class BatchResult:
    """What became of a send_many: every message id in input order, and exactly the ones that failed."""

    message_ids: list[str]
    failed: list[Failed]

    @property
    def ok(self) -> bool:
        return not self.failed

    @property
    def sent(self) -> list[str]:
        """The ids the broker confirmed, in input order."""
        bad = {f.index for f in self.failed}
        return [m for i, m in enumerate(self.message_ids) if i not in bad]

    def raise_on_failure(self) -> BatchResult:
        """Raise the first failure's error (with how many failed), or return self."""
        if self.failed:
            first = self.failed[0]
            raise PublishError(f"{len(self.failed)} of {len(self.message_ids)} messages were not published; "
                               f"the first (#{first.index}, {first.message_id}): {first.error}")
        return self


def reason_of(error: Any) -> str:
    return getattr(error, "reason", "error") if isinstance(error, Nacked | Returned) else "error"


# -- errors a sending thread raises ------------------------------------------------------------------------------
raised = as_publish_error  # one fresh PublishError per sending thread (magne.amqp.errors)


# -- delays --------------------------------------------------------------------------------------------------
def check_delay(delay: Any) -> float | None:
    """A delay as a send takes it (seconds, None or 0 for none). ValueError/TypeError before anything is sent for
    one that can never be: negative, NaN, infinite, or longer than MAX_DELAY."""
    if delay is None:
        return None
    if isinstance(delay, bool) or not isinstance(delay, int | float):
        raise TypeError(f"delay must be a number of seconds, got {type(delay).__name__}")
    if math.isnan(delay) or delay < 0:
        raise ValueError(f"delay must be a number of seconds >= 0, got {delay!r}")
    if delay > MAX_DELAY:
        raise ValueError(f"delay of {delay!r}s is longer than the maximum a message can wait on RabbitMQ "
                         f"({MAX_DELAY:.0f}s, about {MAX_DELAY / 86400:.0f} days)")
    return float(delay) or None


# -- headers ------------------------------------------------------------------------------------------------------
_JSON_PREFIX = struct.Struct(">HHQH").pack
_JSON_TYPE = bytes([len(wire.CONTENT_TYPE)]) + wire.CONTENT_TYPE.encode()


def json_header(message_id: str, body_size: int, priority: int | None = None) -> bytes:
    """The content header payload of wire.properties_for(message_id), by hand: content_type, delivery_mode 2,
    priority when given, and message_id."""
    mid = message_id.encode()
    if len(mid) > 255:
        raise ValueError("message_id longer than 255 bytes")
    # class 60, weight 0, body size, flags: content_type (bit 15), delivery_mode (12), priority (11), message_id (7)
    if priority is None:
        return b"".join((_JSON_PREFIX(60, 0, body_size, 0x9080), _JSON_TYPE, b"\x02", bytes([len(mid)]), mid))
    return b"".join((_JSON_PREFIX(60, 0, body_size, 0x9880), _JSON_TYPE, b"\x02", bytes([priority]),
                     bytes([len(mid)]), mid))


def task_header(task: TaskLike, message_id: str, body_size: int, priority: int | None = None,
                extra: dict[str, Any] | None = None) -> bytes:
    """The header of a task message: by hand, or with the headers before_send hooks add (tracing's traceparent).
    A header value AMQP cannot encode is left out, with a warning: a hook never breaks sending. `extra`: magne's
    own headers (asking for results, a workflow's flow: magne.workflow)."""
    if not hooks.SEND_HOOKS and not extra:
        return json_header(message_id, body_size, priority)
    headers = hooks.send_headers(task.name, task.queue, message_id) if hooks.SEND_HOOKS else {}
    if extra:
        headers = {**(headers or {}), **extra}
    if not headers:
        return json_header(message_id, body_size, priority)
    props = wire.properties_for(message_id)
    props.priority = priority
    props.headers = headers
    try:
        return codec.header_payload(props, body_size)
    except Exception:
        good = {}
        for key, value in headers.items():
            try:
                codec.header_payload(commands.Basic.Properties(headers={key: value}), 0)
                good[key] = value
            except Exception:
                log.warning("a before_send hook set header %s to a value AMQP cannot encode (%s); the message to %s "
                            "goes without it", logs.clean(key, 60), type(value).__name__, task.queue,
                            event="hook_header_dropped")
        props.headers = good
        return codec.header_payload(props, body_size)


# -- declarations ------------------------------------------------------------------------------------------------
def preps_for(queue: str, queue_type: str, declare: bool, max_priority: int | None,
              cache: dict[Any, tuple[Prep, ...]]) -> tuple[Prep, ...]:
    """What must be declared (or checked) before publishing to `queue` through its exchange. Cached in `cache`."""
    key = (queue, queue_type, declare, max_priority)
    got = cache.get(key)
    if got is None:
        if declare:
            got = (Prep(("declare", queue, queue_type, max_priority), topology.declarations(queue, queue_type, max_priority),
                        what=queue),)
        else:
            got = (Prep(("check", queue), [
                (names.QueueDeclare(queue=queue, passive=True), commands.Queue.DeclareOk),
                (names.ExchangeDeclare(exchange=queue, passive=True), commands.Exchange.DeclareOk)],
                passive=True, what=queue),)
        cache[key] = got
    return got


REDECLARE = 10.0  # a delay queue is declared again after this long (its x-expires counts from the declare)


def delay_prep(queue: str, delay: float, queue_type: str) -> tuple[str, Prep]:
    """(routing key, declarations) of the wait queue a message waits in for `delay` seconds, and of the due queue it
    falls into (which must exist when the delay runs out, even if no worker ever declared it: the broker drops a
    message dead-lettered to a queue that does not exist)."""
    ms = topology.delay_ms(delay)
    dq = topology.delay_queue(queue, ms)
    return dq, Prep(("delay", dq), [topology.due_declaration(queue, queue_type),
                                    (topology.declare_delay(queue, ms, queue_type), commands.Queue.DeclareOk)],
                    ttl=REDECLARE, what=dq)
