"""A message handed from the I/O thread to the pool, and back with its outcome."""

from __future__ import annotations

from typing import Any

# Outcomes a worker thread can give a delivery.
ACK = 0  # done
DEAD = 1  # to <queue>.dead with a reason, then ack
REQUEUE = 2  # give it back (shutdown before it started, or interrupted by a cold stop)
RETRY = 3  # a copy to its delay queue with the retry count, then ack


class Delivery:
    # __slots__ and positional init: one of these is made per message on the hot path.
    __slots__ = ("tag", "gen", "queue", "body", "header", "redelivered", "outcome", "reason", "error", "task",
                 "copy_to", "copy_props", "copy_declare", "delay")

    def __init__(self, tag: int, gen: int, queue: str, body: bytes, header: bytes, redelivered: bool) -> None:
        self.tag = tag
        self.gen = gen  # connection generation: tags are only valid on the channel that made them
        self.queue = queue
        self.body = body
        self.header = header
        self.redelivered = redelivered
        self.outcome = ACK
        self.reason = ""
        self.error: dict[str, Any] | None = None
        self.task = ""
        # DEAD and RETRY publish a copy (confirmed) before the ack; the pool prepares it
        # so the I/O thread only writes frames.
        self.copy_to = ""  # routing key on the default exchange
        self.copy_props: Any = None
        self.copy_declare: Any = None  # a queue.declare(nowait) to write first (delay queues)
        self.delay = 0.0

    def copy(self) -> Delivery:
        d = Delivery(self.tag, self.gen, self.queue, self.body, self.header, self.redelivered)
        d.task = self.task
        return d

    def message_id(self) -> str:
        """For log lines: the message id, decoded from the properties only on this cold path."""
        from magne.amqp.frames import decode_properties

        try:
            return decode_properties(self.header).message_id or f"tag {self.tag}"
        except Exception:
            return f"tag {self.tag}"

    def __repr__(self) -> str:
        return f"<delivery {self.queue}#{self.tag} gen={self.gen} task={self.task or '?'}>"
