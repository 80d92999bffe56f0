"""dramatiq's message format and queues, as its RabbitmqBroker (dramatiq 1.x-2.x) makes them.

The body is JSON: `{"queue_name", "actor_name", "args", "kwargs", "options", "message_id", "message_timestamp"}`
("Enqueueing Messages from Other Languages" in dramatiq's docs). `options` carries what magne honours: `eta`
(ms since the epoch: a delayed message, published to `<queue>.DQ`), `retries` (retries spent) and `time_limit`
(ms). Options that ask for more than running the actor (`pipe_target` of a pipeline, `on_success`/`on_failure`
callbacks, a group's completion callback) are refused: magne would silently not do them.

Queues (dramatiq's `_build_queue_arguments`, `_declare_dq_queue`, `_declare_xq_queue`): `<q>` and `<q>.DQ` are
durable with `x-dead-letter-exchange: ""` and `x-dead-letter-routing-key: <q>.XQ` (plus `x-max-priority` when the
broker has a max_priority), and `<q>.XQ` is durable with `x-message-ttl` of 7 days (`dramatiq_dead_message_ttl`
in the environment, as dramatiq reads it). magne declares exactly these, so dramatiq's workers and magne's consume
the same queues side by side; it adds only an exchange named like the queue and bound to it (magne's publishers
route through it; dramatiq publishes on the default exchange and never declares one).
"""

from __future__ import annotations

import functools
import os
from typing import Any

from pamqp import commands

from magne.amqp import names
from magne.errors import BadMessage
from magne.formats.common import MAX_EPOCH, MAX_ID, MAX_NAME, Foreign, args_kwargs, count, field, seconds, text
from magne.topology import Declaration, due_declaration

KIND = "dramatiq"
DEAD_MESSAGE_TTL = 86400000 * 7
# Options naming work to do after the actor ran: magne cannot do it, so such a message is refused, not half-run.
REFUSED_OPTIONS = {
    "pipe_target": "a pipeline's next step",
    "on_success": "an on_success callback",
    "on_failure": "an on_failure callback",
    "group_completion_uuid": "a group's completion callback",
}


def dq_name(queue: str) -> str:
    return f"{queue}.DQ"


def xq_name(queue: str) -> str:
    return f"{queue}.XQ"


def home_of(queue: str) -> str:
    """The canonical queue of `queue` (`q` for `q.DQ`), as dramatiq's q_name."""
    return queue[:-3] if queue.endswith((".DQ", ".XQ")) else queue


def read(msg: dict[str, Any], queue: str) -> Foreign:
    """A dramatiq body (already decoded JSON object) → Foreign, or BadMessage naming the field. Any run thread."""
    actor = text(KIND, "actor_name", msg.get("actor_name"), MAX_NAME)
    assert actor is not None
    text(KIND, "queue_name", msg.get("queue_name"), MAX_NAME, required=False)
    args, kwargs = args_kwargs(KIND, msg.get("args"), msg.get("kwargs"))
    mid = text(KIND, "message_id", msg.get("message_id"), MAX_ID, required=False)
    options = msg.get("options")
    if options is None:
        options = {}
    elif type(options) is not dict:
        raise field(KIND, "options", options, "a JSON object")
    for key, what in REFUSED_OPTIONS.items():
        if options.get(key) is not None:
            raise BadMessage(f"dramatiq field 'options.{key}' asks for {what}, which magne does not run: refused "
                             "rather than half-done (run it on a dramatiq worker, or drop the option)")
    eta = options.get("eta")
    if eta is not None:
        if type(eta) not in (int, float) or not 0 <= eta <= MAX_EPOCH * 1000:
            raise field(KIND, "options.eta", eta, "milliseconds since the epoch")
        eta = eta / 1000
    home = home_of(queue)
    return Foreign(KIND, actor, args, kwargs, mid, count(KIND, "options.retries", options.get("retries")), eta,
                   seconds(KIND, "options.time_limit", options.get("time_limit"), 0.001), None, home)


def _dead_ttl() -> int:
    try:
        return int(os.environ.get("dramatiq_dead_message_ttl", DEAD_MESSAGE_TTL))
    except ValueError:
        return DEAD_MESSAGE_TTL


def queue_arguments(queue: str, max_priority: int | None = None) -> dict[str, Any]:
    args: dict[str, Any] = {"x-dead-letter-exchange": "", "x-dead-letter-routing-key": xq_name(queue)}
    if max_priority:
        args["x-max-priority"] = max_priority
    return args


@functools.lru_cache(maxsize=256)
def xq_declaration(queue: str) -> commands.Queue.Declare:
    """`<queue>.XQ`'s declaration, made once per queue (a dead letter's copy takes it; nobody changes it)."""
    return names.QueueDeclare(queue=xq_name(queue), durable=True, arguments={"x-message-ttl": _dead_ttl()})


def declarations(queue: str, max_priority: int | None = None) -> list[Declaration]:
    """A dramatiq queue as its broker declares it (with .DQ and .XQ), magne's exchange routing to it, and magne's
    `<queue>.due`, where a message magne deferred (not due yet) comes back (magne.topology)."""
    args = queue_arguments(queue, max_priority)
    return [
        (names.ExchangeDeclare(exchange=queue, exchange_type="direct", durable=True), commands.Exchange.DeclareOk),
        (names.QueueDeclare(queue=queue, durable=True, arguments=args), commands.Queue.DeclareOk),
        (names.QueueBind(queue=queue, exchange=queue, routing_key=queue), commands.Queue.BindOk),
        (names.QueueDeclare(queue=dq_name(queue), durable=True, arguments=args), commands.Queue.DeclareOk),
        (xq_declaration(queue), commands.Queue.DeclareOk),
        due_declaration(queue),
    ]


def dq_declarations(queue: str, max_priority: int | None = None) -> list[Declaration]:
    """What is checked before `<queue>.DQ` is consumed (its queue and dead-letter queue)."""
    return [(names.QueueDeclare(queue=dq_name(queue), durable=True, arguments=queue_arguments(queue, max_priority)),
             commands.Queue.DeclareOk), (xq_declaration(queue), commands.Queue.DeclareOk)]
