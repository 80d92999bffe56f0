"""Names and declarations of the broker objects a task uses.

Compatible with the original magne: a task `name` with no explicit queue lives in a
durable queue `NAME`, bound to a durable direct exchange `NAME` with routing key
`NAME`. Failed messages go to the durable queue `<queue>.dead`, published there
through the default exchange.
"""

from __future__ import annotations

from typing import Any

from pamqp import commands

from magne.amqp.connection import Connection


def default_queue(task_name: str) -> str:
    return task_name.upper()


def dead_queue(queue: str) -> str:
    return f"{queue}.dead"


def queue_arguments(queue_type: str = "classic") -> dict[str, Any]:
    # Classic queues are declared without arguments so that queues made by the
    # original magne (or by hand) redeclare without a 406 PRECONDITION_FAILED.
    if queue_type == "classic":
        return {}
    raise ValueError(f"unknown queue type {queue_type!r}")


def declare(conn: Connection, channel: int, queue: str, queue_type: str = "classic") -> None:
    """Declare a task queue, its exchange and binding, and its dead-letter queue."""
    conn.rpc(
        channel,
        commands.Exchange.Declare(exchange=queue, exchange_type="direct", durable=True),
        commands.Exchange.DeclareOk,
    )
    conn.rpc(
        channel,
        commands.Queue.Declare(queue=queue, durable=True, arguments=queue_arguments(queue_type)),
        commands.Queue.DeclareOk,
    )
    conn.rpc(
        channel,
        commands.Queue.Bind(queue=queue, exchange=queue, routing_key=queue),
        commands.Queue.BindOk,
    )
    conn.rpc(
        channel,
        commands.Queue.Declare(queue=dead_queue(queue), durable=True, arguments=queue_arguments(queue_type)),
        commands.Queue.DeclareOk,
    )
