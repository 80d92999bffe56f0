"""Follow-ups: what a finished message asked to publish (its result record, its pipeline's next step) goes out
confirmed on the worker's link Sender before the original is acked. I/O thread only.

The same path as a retry or dead-letter copy (magne/io/settle.py): the original stays unacked until the broker
confirmed every follow-up, so a crash in between duplicates a record or a step, never loses one. A follow-up the
broker refuses is published again with backoff through the settlement's `waiting` heap (so a warm shutdown waits
for it, and a new channel generation drops it: its original comes back and runs again). After a refused
declaration (the results stream or a step's queue exists with other arguments) it goes without the declaration.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from typing import Any

from magne import logs
from magne.amqp.errors import MagneError, PublishError
from magne.backoff import Backoff
from magne.delivery import Delivery
from magne.engine.sender import Outgoing, Sender
from magne.workflow import Next

log = logs.Log("magne.io")
MAX_BACKOFF = 60.0


class Follow(Outgoing):
    """One follow-up on its way through the Sender."""

    __slots__ = ("d", "nxt", "refusals")

    @property
    def gen(self) -> int:
        return self.d.gen


class Again:
    """A refused follow-up waiting in the settlement's heap for its next try (`gen`: its original's)."""

    __slots__ = ("d", "nxt", "refusals")

    def __init__(self, d: Delivery, nxt: Next, refusals: int) -> None:
        self.d, self.nxt, self.refusals = d, nxt, refusals

    @property
    def gen(self) -> int:
        return self.d.gen


class Followups:
    """Made by the Settlement. `left`: follow-ups not yet confirmed, per original (bounded by the unacked window)."""

    def __init__(self, sender: Sender, frame_max: int, done: Callable[[Delivery], None],
                 retry_later: Callable[[float, Again], None]) -> None:
        self.sender, self.frame_max, self.done, self.retry_later = sender, frame_max, done, retry_later
        self.left: dict[Delivery, int] = {}
        self.gen = 0

    def reset(self, gen: int) -> None:
        """A new channel generation: the old originals come back redelivered; forget them."""
        self.gen = gen
        self.left = {d: n for d, n in self.left.items() if d.gen == gen}

    def put(self, d: Delivery, nexts: list[Next]) -> None:
        """Publish `nexts`; `done(d)` (ack the original) once all are confirmed."""
        self.left[d] = len(nexts)
        for nxt in nexts:
            self._send(d, nxt, 0)

    def again(self, a: Again) -> None:
        if a.d in self.left:
            self._send(a.d, a.nxt, a.refusals)

    def _send(self, d: Delivery, nxt: Next, refusals: int) -> None:
        try:
            f = Follow(nxt.exchange, nxt.routing_key, nxt.header, nxt.body, nxt.message_id, nxt.preps, math.inf,
                       self.frame_max, self._confirmed)
        except Exception as exc:  # a header or body that cannot be framed: it can never go; the original goes back
            log.error("a result or next step of message %s cannot be framed (%s); it is left out", d.message_id(),
                      type(exc).__name__, event="follow_unframable")
            self._confirmed_one(d)
            return
        f.d, f.nxt, f.refusals = d, nxt, refusals
        self.sender.put(f)

    def _confirmed(self, m: Outgoing, error: MagneError | None) -> None:
        """From the sender (I/O thread)."""
        f: Any = m
        d = f.d
        if d.gen != self.gen or d not in self.left:
            return  # its channel is gone: the original comes back redelivered
        if error is None:
            self._confirmed_one(d)
            return
        nxt = f.nxt
        if isinstance(error, PublishError) and error.permanent and nxt.preps:
            nxt = nxt._replace(preps=())  # its declaration was refused: publish to what exists
        backoff = Backoff(1.0, MAX_BACKOFF)
        backoff.attempt = f.refusals
        delay = backoff.next()
        (log.error if f.refusals >= 2 else log.warning)(
            "a result or next step of message %s to %s was refused (%s); publishing it again in %.1fs, the original "
            "stays unacked meanwhile", d.message_id(), logs.clean(nxt.routing_key), error, delay,
            event="follow_refused")
        self.retry_later(time.monotonic() + delay, Again(d, nxt, f.refusals + 1))

    def _confirmed_one(self, d: Delivery) -> None:
        n = self.left[d] - 1
        if n:
            self.left[d] = n
        else:
            del self.left[d]
            self.done(d)
