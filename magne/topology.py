"""Names and declarations of the broker objects a task uses.

Compatible with the original magne: a task `name` with no explicit queue lives in a
durable queue `NAME`, bound to a durable direct exchange `NAME` with routing key
`NAME`. Failed messages go to the durable queue `<queue>.dead`, published there
through the default exchange. Delayed messages (delays, retry backoff) wait on the
broker, never unacked in a worker: in `<queue>.wait.<ms>`, a queue whose message
TTL is that delay. One queue per delay value, so a short delay never waits behind a
longer one.

A wait queue dead-letters into `<queue>.due`, not into the task queue: a queue with no
length limit of magne's that the worker consumes beside `<queue>` and treats as the same
queue. Broker-side dead-lettering out of a classic queue is at-most-once, so a delayed
message falling due into a task queue that is full (`x-max-length` with
`reject-publish`, often set by an operator's policy) would be dropped in silence; `.due`
takes it whatever the task queue holds. (The earlier `<queue>.delay.<ms>` queues, which
dead-letter into the task queue, are left alone: redeclaring them with another target
would be refused with 406, and they expire once unused.)

Declarations are returned as (method, reply type) pairs, so the blocking client
can call them one by one and the I/O thread can pipeline them. Their methods are
magne.amqp.names's, which take every name RabbitMQ takes (pamqp's own refuse
non-ASCII names and exchange names over 127 characters).
"""

from __future__ import annotations

import math
from typing import Any

from pamqp import commands

from magne.amqp import names

QUEUE_TYPES = ("classic", "quorum")
DEFAULT_DELIVERY_LIMIT = 20
# Broker-side dead-lettering of a quorum queue is at-most-once by default: a message the target
# does not confirm is dropped. at-least-once (3.10+) keeps it until the target has it, and needs
# reject-publish overflow.
AT_LEAST_ONCE = {"x-dead-letter-strategy": "at-least-once", "x-overflow": "reject-publish"}
Declaration = tuple[Any, type]
# The longest delay (and retry backoff), in seconds: RabbitMQ refuses an x-message-ttl or x-expires above
# 2^32 - 1 ms (about 49.7 days), and a delay queue expires 10% after its TTL (declare_delay).
MAX_DELAY = 3_900_000.0  # 45.1 days; delay_ms() keeps it at 3,900,000,000 ms, whose x-expires is 4,290,000,000


def default_queue(task_name: str) -> str:
    return task_name.upper()


# A task queue's name leaves room for its longest derived name, `<queue>.wait.<ms>` with the longest delay (the
# room kept is that of the earlier, longer `.delay.`, so that no name valid before becomes invalid).
MAX_QUEUE_BYTES = names.MAX_BYTES - len(".delay.") - len(str(int(MAX_DELAY * 1000)))


def queue_name_problem(queue: object) -> str | None:
    """Why `queue` cannot be a task queue, or None. RabbitMQ takes any UTF-8 name of up to 255 bytes except the
    empty one (the broker would make up a name) and `amq.*` (reserved: 403 ACCESS_REFUSED); magne also needs
    room for `<queue>.wait.<ms>` (MAX_QUEUE_BYTES) and uses the name as the queue's exchange too."""
    why = names.name_problem(queue)
    if why is not None:
        return why
    assert isinstance(queue, str)
    if not queue:
        return "is empty"
    if queue.startswith("amq."):
        return "starts with 'amq.', which RabbitMQ reserves for its own queues and exchanges"
    size = len(queue.encode("utf-8"))
    if size > MAX_QUEUE_BYTES:
        return (f"is {size} bytes of UTF-8; a task queue takes at most {MAX_QUEUE_BYTES}, so that its delay queue "
                f"(<queue>.wait.<ms>) stays within RabbitMQ's 255")
    return None


def mismatch_hint(dramatiqs: bool) -> str:
    """What a 406 "inequivalent arg" while the worker sets up its queues means (magne.io.consumer, I/O thread), for
    a queue of magne's or one of dramatiq's (`--accept dramatiq`), whose messages must not be deleted with it."""
    if dramatiqs:
        return ("The queue exists with other arguments than dramatiq's broker gives it (magne declares it as dramatiq "
                "does): if dramatiq's broker has max_priority, give the queue's magne tasks @task(max_priority=...) "
                "of the same value; the .XQ's x-message-ttl is dramatiq_dead_message_ttl, read from the "
                "environment; a queue that is not dramatiq's is left out of --dramatiq-queues. Do not delete the "
                "queue: it holds the producers' messages")
    return ("The queue exists with other arguments than this worker declares: was it declared as another queue "
            "type? Start the worker with the queue's type (--queue-type or @task(queue_type=...)), or delete the "
            "queue")


def dead_queue(queue: str) -> str:
    return f"{queue}.dead"


def due_queue(queue: str) -> str:
    """Where the wait queues of `queue` hand their messages back (module docstring): consumed as `queue` itself."""
    return f"{queue}.due"


def queue_arguments(queue: str, queue_type: str = "classic", dead: bool = False,
                    max_priority: int | None = None) -> dict[str, Any]:
    if queue_type == "classic":
        # No arguments unless asked, so that queues made by the original magne (or by hand)
        # redeclare without a 406 PRECONDITION_FAILED.
        return {"x-max-priority": max_priority} if max_priority and not dead else {}
    if queue_type == "quorum":
        args: dict[str, Any] = {"x-queue-type": "quorum"}
        if not dead:
            # A message that keeps killing workers is dead-lettered by the broker
            # after this many deliveries (x-death says "delivery_limit").
            args["x-delivery-limit"] = DEFAULT_DELIVERY_LIMIT
            args["x-dead-letter-exchange"] = ""
            args["x-dead-letter-routing-key"] = dead_queue(queue)
            args.update(AT_LEAST_ONCE)
        return args
    raise ValueError(f"unknown queue type {queue_type!r}; use one of {', '.join(QUEUE_TYPES)}")


def declarations(queue: str, queue_type: str = "classic", max_priority: int | None = None) -> list[Declaration]:
    """A task queue, its exchange and binding, its due queue and its dead-letter queue."""
    return [
        (names.ExchangeDeclare(exchange=queue, exchange_type="direct", durable=True), commands.Exchange.DeclareOk),
        (names.QueueDeclare(queue=queue, durable=True, arguments=queue_arguments(queue, queue_type,
                                                                                max_priority=max_priority)),
         commands.Queue.DeclareOk),
        (names.QueueBind(queue=queue, exchange=queue, routing_key=queue), commands.Queue.BindOk),
        due_declaration(queue, queue_type),
        dead_declaration(queue, queue_type),
    ]


def due_declaration(queue: str, queue_type: str = "classic") -> Declaration:
    """The due queue: the task queue's arguments without a priority (declared the same way by the worker, by
    `send --declare` and before every delayed publish, so that the three never disagree and draw a 406); a quorum
    task's is quorum, taking its delivery limit and its dead-lettering into `<queue>.dead`."""
    return (names.QueueDeclare(queue=due_queue(queue), durable=True, arguments=queue_arguments(queue, queue_type)),
            commands.Queue.DeclareOk)


def dead_declaration(queue: str, queue_type: str = "classic") -> Declaration:
    return (names.QueueDeclare(queue=dead_queue(queue), durable=True,
                                   arguments=queue_arguments(queue, queue_type, dead=True)), commands.Queue.DeclareOk)


def delay_ms(seconds: float) -> int:
    """The delay rounded up to two significant digits (1234 ms → 1300 ms), so that a
    jittered backoff makes tens of delay queues per decade, not thousands. Never shorter than asked (at most
    10% longer); at most MAX_DELAY (callers refuse longer delays)."""
    ms = max(1, math.ceil(seconds * 1000))
    if ms < 100:
        return ms
    step = 10 ** (len(str(ms)) - 2)
    return -(-ms // step) * step


def wait_ms(seconds: float) -> int:
    """A wait until an eta (magne.formats.defer): on delay_ms's grid, rounded DOWN (1234 ms → 1200 ms; exact under
    100 ms), so the message never comes back late by up to 10% of a long wait. It may come back early, and then
    waits again for the rest: each hop leaves less than a tenth, so a 45-day wait takes at most 8 hops."""
    if seconds < 0.1:  # the last hop: whole milliseconds, never early
        return max(1, math.ceil(seconds * 1000))
    ms = int(seconds * 1000)
    step = 10 ** (len(str(ms)) - 2)
    return ms // step * step


def delay_queue(queue: str, ms: int) -> str:
    return f"{queue}.wait.{ms}"


def declare_delay(queue: str, ms: int, queue_type: str = "classic") -> commands.Queue.Declare:
    """The declaration of the wait queue for `queue` and delay `ms`.

    Redeclared before every publish into it: x-expires (which removes the queue once
    unused) counts from the last declare, and exceeds the TTL, so a waiting message
    always expires into the due queue before its wait queue can go away. The wait
    queue of a quorum task is quorum too, dead-lettering at-least-once, so a delayed
    retry survives the loss of a node.
    """
    args: dict[str, Any] = {
        "x-message-ttl": ms,
        "x-dead-letter-exchange": "",
        "x-dead-letter-routing-key": due_queue(queue),
        "x-expires": ms + max(60_000, ms // 10),
    }
    if queue_type == "quorum":
        args.update({"x-queue-type": "quorum", **AT_LEAST_ONCE})
    return names.QueueDeclare(queue=delay_queue(queue, ms), durable=True, arguments=args)
