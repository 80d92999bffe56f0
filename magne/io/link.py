"""The publishing link: the I/O thread's second connection, for retry and dead-letter copies.

Why a second connection: RabbitMQ (3.x) blocks a connection that publishes during a
memory or disk alarm, and a blocked connection's socket is not read at all, so
acks on it would stall too (connection.blocked is only sent once the connection
has published). Copies therefore go out here, and the consuming connection never
publishes: a blocked retry waits, acks keep flowing. The link opens on the first
copy and closes after IDLE_CLOSE seconds idle, so a worker whose tasks succeed
holds exactly one connection. Its heartbeats are off (it may sit blocked for as
long as an alarm lasts); a dead link is found by its socket, or by a confirm
overdue for `confirm_timeout` while not blocked.

Everything here runs on the I/O thread and never blocks: the connection opens
through the I/O thread's selector like the consuming one, and closes politely
without waiting. Copies are published mandatory; a basic.return (unroutable) or a
basic.nack is a failed copy, never an ack of the original.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from pamqp import commands

from magne import logs
from magne.amqp import codec
from magne.amqp.errors import ConnectionLost
from magne.amqp.url import Nodes
from magne.delivery import Delivery
from magne.engine.connection import Connection, State

log = logs.Log("magne.io")

CH = 1
IDLE_CLOSE = 60.0


class PublishLink:
    """Owned by the I/O thread. `on_confirm(delivery, ok, why)` is called for every copy's fate."""

    def __init__(self, nodes: Nodes, name: str, on_confirm: Callable[[Delivery, bool, str], None],
                 confirm_timeout: float = 120.0) -> None:
        self.nodes = nodes  # shared with the consumer: the link opens on the node the consumer uses
        self.name = name
        self.on_confirm = on_confirm
        self.confirm_timeout = confirm_timeout
        self.conn: Connection | None = None
        self.ready = False  # channel open and in confirm mode
        self.confirms: dict[int, tuple[Delivery, float]] = {}  # seq -> (copy, when published); insertion = seq order
        self._returned: list[str] = []  # routing keys returned since the last ack
        self.seq = 0
        self.last_used = 0.0
        self.opened = 0
        # --metrics: called with each copy's confirm latency in seconds (magne.io.stats.Tally.confirm). Cold path.
        self.on_latency: Callable[[float], None] | None = None

    @property
    def is_open(self) -> bool:
        return self.conn is not None

    def open(self, now: float) -> None:
        conn = Connection(self.nodes.current, self.name, heartbeat=0)
        conn.on_open = self._on_open
        conn.on_frame = self._on_frame
        conn.on_content = self._on_return
        conn.on_blocked = self._on_blocked
        self.conn, self.ready, self.seq, self.last_used = conn, False, 0, now
        conn.start(now)

    def _on_open(self) -> None:
        assert self.conn is not None
        self.conn.call(CH, commands.Channel.Open(), (commands.Channel.OpenOk,))
        self.conn.call(CH, commands.Confirm.Select(), (commands.Confirm.SelectOk,), self._on_ready)

    def _on_ready(self, _frame: Any) -> None:
        self.ready = True
        self.opened += 1
        log.info("opened the publishing connection for retry and dead-letter copies", event="link_open")

    def publish(self, d: Delivery, now: float) -> None:
        """Write the copy of `d` (after its queue's declare). Only while `ready`."""
        conn = self.conn
        assert conn is not None and self.ready
        header = d.copy_header
        if len(header) + codec.FRAME_OVERHEAD > conn.frame_max:
            header = codec.header_payload(commands.Basic.Properties(delivery_mode=2, headers={
                "x-magne-reason": d.reason[:64], "x-magne-queue": d.queue,
                "x-magne-dropped-headers": f"the broker's frame_max {conn.frame_max} is too small for the copy's headers"}),
                len(d.body))
        data = codec.encode_publish(CH, "", d.copy_to, d.body, header, conn.frame_max, mandatory=True)
        if d.copy_declare is not None:
            conn.call(CH, d.copy_declare, (commands.Queue.DeclareOk,))
        conn.outbox.write(data)
        self.seq += 1
        self.confirms[self.seq] = (d, now)
        self.last_used = now

    def tick(self, now: float) -> float | None:
        """Timers: the connection's own, an overdue confirm, the idle close. Returns the next wake-up."""
        conn = self.conn
        if conn is None:
            return None
        wake = conn.tick(now)
        if conn.state is State.CLOSED:
            self.conn, self.ready = None, False
            return None
        if self.confirms and not conn.blocked:
            oldest = next(iter(self.confirms.values()))[1]
            if now - oldest > self.confirm_timeout:
                raise ConnectionLost(f"publishing connection: no confirm for {now - oldest:.0f}s")
            wake = min(wake or now + 1.0, oldest + self.confirm_timeout)
        if self.ready and not self.confirms and not conn.outbox and now - self.last_used > IDLE_CLOSE:
            log.info("closing the idle publishing connection", event="link_close")
            self.ready = False
            conn.close(now)
            return now + 0.1
        if self.ready and not self.confirms:
            wake = min(wake or now + IDLE_CLOSE, self.last_used + IDLE_CLOSE + 0.01)
        return wake

    def _on_frame(self, _channel: int, frame: Any) -> None:
        if isinstance(frame, commands.Basic.Ack | commands.Basic.Nack):
            ok = isinstance(frame, commands.Basic.Ack)
            seqs = [s for s in self.confirms if s <= frame.delivery_tag] if frame.multiple else (
                [frame.delivery_tag] if frame.delivery_tag in self.confirms else [])
            returned, self._returned = self._returned, []
            now = time.monotonic() if self.on_latency is not None else 0.0
            for s in seqs:
                d, sent = self.confirms.pop(s)
                if self.on_latency is not None:
                    self.on_latency(now - sent)
                if d.copy_to in returned:
                    self.on_confirm(d, False, "returned as unroutable")
                else:
                    self.on_confirm(d, ok, "" if ok else "refused by the broker (basic.nack)")

    def _on_return(self, _channel: int, method: Any, _header: bytes, _body: bytes) -> None:
        """A basic.return comes right before the ack that covers the same publish.

        Which of the copies that ack covers was returned cannot be told apart when several go to
        the same queue, so every copy to that routing key in the next ack counts as failed and is
        published again: a duplicate at worst, never an original acked for a copy that went nowhere.
        """
        if isinstance(method, commands.Basic.Return):
            self._returned.append(method.routing_key)

    def _on_blocked(self, blocked: bool, reason: str) -> None:
        if blocked:
            log.warning("broker blocked publishing (%s): retry and dead-letter copies wait, acks go on",
                        logs.clean(reason), event="link_blocked")
        else:
            log.info("broker unblocked publishing; %d copies waiting for their confirm", len(self.confirms),
                     event="link_unblocked")

    def fail(self) -> list[Delivery]:
        """Drop a broken link; returns the copies that were never confirmed, oldest first (to publish again)."""
        pending = [d for d, _ in self.confirms.values()]
        self.confirms.clear()
        self._returned = []
        if self.conn is not None:
            self.conn.abort()
        self.conn, self.ready = None, False
        return pending

    def close(self, now: float) -> None:
        """Polite close without waiting (warm shutdown). The socket goes at close-ok or after a timeout (tick).

        A blocked link is dropped instead: during an alarm the broker does not read it, so
        its close-ok would never come.
        """
        if self.conn is not None:
            self.ready = False
            if self.conn.blocked:
                self.abort()
            else:
                self.conn.close(now)

    def abort(self) -> None:
        if self.conn is not None:
            self.conn.abort()
        self.conn, self.ready = None, False
