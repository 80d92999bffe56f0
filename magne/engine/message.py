"""A message on its way through a Sender, and the declarations it needs: made by the sending thread.

`Outgoing` holds the message's frames (encoded once, on the sending thread, for the frame size
the connection will most likely use) and what a basic.return is matched on, not the body and
header a second time; `reframe` frames it again if a broker negotiated a smaller frame_max.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

from magne.amqp import codec
from magne.amqp.errors import MagneError, PublishError
from magne.amqp.protocol import DEFAULT_FRAME_MAX

PUB, ADMIN = 1, 2  # the Sender's channels: messages (confirm mode), declarations


class Prep:
    """What must exist before a message may go to its destination: declarations, or passive checks (`passive`:
    a refusal then means the destination does not exist). `ttl`: declared again after this many seconds (a delay
    queue's x-expires counts from its last declaration). Made by the sending side, shared, never changed."""

    __slots__ = ("key", "methods", "passive", "ttl", "what")

    def __init__(self, key: Any, methods: list[tuple[Any, type]], passive: bool = False, ttl: float | None = None,
                 what: str = "") -> None:
        self.key, self.methods, self.passive, self.ttl, self.what = key, methods, passive, ttl, what


class NoSuchQueue(PublishError):
    """A passive check found no such queue or exchange (a send with declare=False, `magne send` without --declare)."""

    permanent = True


class Outgoing:
    """One message on its way: made by the sending thread, then owned by the loop's thread until settled.

    Holds its frames (`data`) and what a basic.return is matched on, not the body and header a second time.
    `done(error)` is called exactly once, on the loop's thread (None: confirmed)."""

    __slots__ = ("data", "exchange", "routing_key", "message_id", "body_hash", "preps", "deadline", "done", "charged",
                 "rerouted", "settled", "frame_max", "index")

    def __init__(self, exchange: str, routing_key: str, header: bytes, body: bytes, message_id: str | None,
                 preps: tuple[Prep, ...] = (), deadline: float = math.inf, frame_max: int = DEFAULT_FRAME_MAX,
                 done: Callable[[Outgoing, MagneError | None], None] | None = None) -> None:
        self.data = codec.encode_content(codec.publish_method(exchange, routing_key, True, PUB), header, body, frame_max,
                                         PUB)
        self.exchange, self.routing_key, self.message_id = exchange, routing_key, message_id
        self.body_hash = hash(body)
        self.preps, self.deadline, self.frame_max = preps, deadline, frame_max
        self.done = done
        self.charged = 0  # closures of the publish channel this message caused
        self.rerouted = False  # a 312 NO_ROUTE already made us declare its queue again
        self.settled = False
        self.index = 0  # its place in a batch (send_many)

    def settle(self, error: MagneError | None) -> None:
        """Loop thread: the outcome, once."""
        if self.settled:
            return
        self.settled = True
        self.data = b""
        if self.done is not None:
            try:
                self.done(self, error)
            except Exception:  # a waiter's failure must not take the loop down
                pass


def reframe(data: bytes, frame_max: int) -> bytes:
    """A publish encoded for a larger frame_max, framed again for a smaller one (a reconnect to a node that
    negotiated less). Cold path."""
    pos, parts = 0, []
    while pos < len(data):
        size = int.from_bytes(data[pos + 3 : pos + 7], "big")
        parts.append(data[pos : pos + 8 + size])
        pos += 8 + size
    method, header = parts[0], parts[1][7:-1]
    body = b"".join(p[7:-1] for p in parts[2:])
    return codec.encode_content(method, header, body, frame_max, PUB)
