"""A message handed from the I/O thread to the pool, and back with its outcome."""

from __future__ import annotations

import enum
from typing import Any

from magne.amqp.codec import decode_properties
from magne.logs import clean


class Outcome(enum.IntEnum):
    """What the I/O thread does with a delivery once the pool is done with it."""

    ACK = 0  # done
    DEAD = 1  # a copy to <queue>.dead with the reason (confirmed), then ack
    RETRY = 2  # a copy to its delay queue with the retry count (confirmed), then ack
    REQUEUE = 3  # basic.reject(requeue): it ran and was cut short (cold stop); counts as a delivery
    GIVE_BACK = 4  # basic.nack(requeue): it never started; does not count towards a delivery limit


_ACK = Outcome.ACK  # looked up once: an enum member lookup costs ~70 ns, paid per message otherwise


class Delivery:
    """One message of the consuming channel. Made by the I/O thread, filled in by one pool thread.

    __slots__ and positional init: one of these is made per message on the hot path.
    """

    __slots__ = ("tag", "gen", "queue", "body", "header", "redelivered", "outcome", "task", "reason", "error",
                 "copy_to", "copy_header", "copy_declare", "delay", "blame", "meta", "started", "follow")

    def __init__(self, tag: int, gen: int, queue: str, body: bytes, header: bytes, redelivered: bool) -> None:
        self.tag = tag
        self.gen = gen  # connection generation: tags are only valid on the channel that made them
        self.queue = queue
        self.body = body
        self.header = header  # the content header payload, undecoded (decoded only on cold paths)
        self.redelivered = redelivered
        self.outcome = _ACK
        self.task = ""
        self.reason = ""
        self.error: dict[str, str] | None = None
        # DEAD and RETRY publish a copy (confirmed) before the ack; the pool prepares it
        # (magne.policy) so the I/O thread only writes frames.
        self.copy_to = ""  # routing key on the default exchange
        self.copy_header = b""  # the copy's content header payload
        self.copy_declare: Any = None  # a queue.declare to write first (delay queues)
        self.delay = 0.0
        self.blame = 0  # times the publishing link failed while this copy was the oldest unconfirmed
        self.meta: Any = None  # a foreign (dramatiq, celery) message's validated fields: magne.formats.Foreign
        self.started = 0.0  # when its task started (time.monotonic), set just before it is reported (magne.events)
        self.follow: Any = None  # results and next steps to publish before the ack (magne.workflow), when asked

    def copy(self) -> Delivery:
        d = Delivery(self.tag, self.gen, self.queue, self.body, self.header, self.redelivered)
        d.task = self.task
        d.meta = self.meta
        return d

    def message_id(self) -> str:
        """For log lines: the message id, decoded from the properties only on this cold path, escaped."""
        meta_id = getattr(self.meta, "message_id", None)  # a foreign message's own id (dramatiq keeps it in the body)
        if isinstance(meta_id, str) and meta_id:
            return clean(meta_id, 80)
        try:
            mid = decode_properties(self.header).message_id
        except Exception:
            mid = None
        return clean(mid, 80) if isinstance(mid, str) and mid else f"tag {self.tag}"

    def __repr__(self) -> str:
        return f"<delivery {self.queue}#{self.tag} gen={self.gen} task={self.task or '?'}>"
