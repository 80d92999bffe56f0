"""Exchange and queue names as RabbitMQ takes them, and the AMQP methods that carry them.

RabbitMQ takes any UTF-8 string of up to 255 bytes as a queue or exchange name
(a short string on the wire). pamqp checks names against the AMQP 0-9-1 grammar
instead (`^[a-zA-Z0-9-_.:@#,/+ ]*$`, and at most 127 characters for an exchange),
in each method's constructor and again in marshal(): a task named "envoyer_été",
or a queue of 200 characters, could never be declared, consumed or published to,
and the worker died with "Invalid value for exchange". RabbitMQ never applied that
grammar (its own clients do not), so the methods below are pamqp's own (the same
class attributes and encoding; `isinstance` still holds) with `validate()` checking
what RabbitMQ checks: a string whose UTF-8 fits in 255 bytes. Use them wherever a
name chosen by a user goes out. What a task may use as its queue (not empty, not
`amq.`, room for the `.delay.<ms>` suffix) is magne's rule: topology.queue_name_problem.
"""

from __future__ import annotations

from pamqp import commands

MAX_BYTES = 255  # a short string: RabbitMQ's limit for queue and exchange names


def name_problem(name: object) -> str | None:
    """Why RabbitMQ could not take `name` as a queue or exchange name on the wire, or None if it can."""
    if not isinstance(name, str):
        return f"must be a string, not {type(name).__name__}"
    try:
        size = len(name.encode("utf-8"))
    except UnicodeEncodeError:
        return "is not valid UTF-8 (it holds a lone surrogate)"
    if size > MAX_BYTES:
        return f"is {size} bytes of UTF-8; RabbitMQ takes at most {MAX_BYTES}"
    return None


def _check(frame: object, *fields: str) -> None:
    for field in fields:
        value = getattr(frame, field)
        if value is not None and value != "":
            why = name_problem(value)
            if why is not None:
                raise ValueError(f"{field} name {str(value)[:60]!r} {why}")


class ExchangeDeclare(commands.Exchange.Declare):
    def validate(self) -> None:
        _check(self, "exchange")


class ExchangeDelete(commands.Exchange.Delete):
    def validate(self) -> None:
        _check(self, "exchange")


class QueueDeclare(commands.Queue.Declare):
    def validate(self) -> None:
        _check(self, "queue")


class QueueBind(commands.Queue.Bind):
    def validate(self) -> None:
        _check(self, "queue", "exchange")


class QueueDelete(commands.Queue.Delete):
    def validate(self) -> None:
        _check(self, "queue")


class QueuePurge(commands.Queue.Purge):
    def validate(self) -> None:
        _check(self, "queue")


class BasicPublish(commands.Basic.Publish):
    def validate(self) -> None:
        _check(self, "exchange")


class BasicConsume(commands.Basic.Consume):
    def validate(self) -> None:
        _check(self, "queue")


class BasicGet(commands.Basic.Get):
    def validate(self) -> None:
        _check(self, "queue")
