"""Confirmed publishing: the one mechanism behind every publish of magne (an application's sends, a worker's
retry and dead-letter copies).

A Sender is an endpoint of an engine loop (magne/engine/loop.py): one connection, opened when
there is something to publish and closed after IDLE_CLOSE seconds idle, with two channels:
- ADMIN (2) carries declarations and passive checks (`Prep`). A declaration the broker refuses
  (a queue that does not exist for a passive check, a queue of another type) closes this
  channel only: the messages that needed it fail, with NoSuchQueue or the broker's reason, and
  nothing else is touched.
- PUB (1), in confirm mode, carries the messages. Every publish is numbered in the confirm
  tracker (magne.amqp.confirms) and settled by its own number: confirmed, nacked, or returned as
  unroutable. A message published with `declare` that comes back 312 NO_ROUTE (its queue was
  deleted under a long-lived sender) is declared again and published once more.

Faults. A lost connection puts every unconfirmed message back in line, in order, for the next
connection (the broker may have taken it: a duplicate is possible, a loss is not); nobody is
charged for it. A closure of PUB by the broker (a refusal of something we sent) is charged to
the message that caused it, and only to it: the unconfirmed messages are published again one at
a time until the culprit is found (a message that closes the channel while it is the only one
unconfirmed caused it), and the declarations are checked again first (an exchange deleted under
us is the common cause). A message that caused MAX_CHARGES closures fails with the broker's
reason; no message ever fails because another one was refused.

A message may carry a deadline (an application's confirm timeout): past it, it fails, whether it
waits in line or for its confirm. A worker's copies have none; a connection whose oldest confirm
is `stall_timeout` overdue while not blocked is given up and opened again.

Loop thread only; the messages (magne/engine/message.py) are made by the sending thread.
"""
from __future__ import annotations

import math
import time
from collections import deque
from collections.abc import Callable
from typing import Any

from pamqp import commands

from magne import logs
from magne.amqp import codec
from magne.amqp.confirms import Returned, Tracker
from magne.amqp.errors import AMQPError, BrokerTimeout, ChannelClosed, ConnectionClosed, ConnectionLost, MagneError, PublishError
from magne.amqp.url import Nodes
from magne.backoff import Backoff
from magne.engine.connection import Connection, State
from magne.engine.message import ADMIN, PUB, NoSuchQueue, Outgoing, Prep, reframe
from magne.engine.reconnect import Reconnector

__all__ = ["ADMIN", "MAX_CHARGES", "PUB", "NoSuchQueue", "Outgoing", "Prep", "Sender", "reframe"]

log = logs.Log("magne.sender")

MAX_CHARGES = 2  # closures a message may cause before it fails
IDLE_CLOSE = 60.0
MAX_OUTBOX = 4 << 20  # bytes queued for the socket before the sender stops taking more


class Sender:
    """An engine endpoint (conn, tick, failed, busy). `on_settle` hooks are the Outgoing's own `done`."""

    def __init__(self, nodes: Nodes, name: str, heartbeat: int | None = None, window: int = 1000,
                 stall_timeout: float = 0.0, idle_close: float = IDLE_CLOSE, give_up_after: float = 0.0,
                 follows: bool = False) -> None:
        self.nodes = nodes
        self.name = name
        self.heartbeat = heartbeat
        self.window = max(1, window)
        self.stall_timeout = stall_timeout  # 0: none (messages have deadlines instead)
        self.idle_close = idle_close
        self.give_up_after = give_up_after  # >0: fail what waits once the broker was unreachable this long
        # `follows`: this connection goes wherever another one sharing `nodes` is (a worker's link follows its
        # consuming connection): its failures back off but never move the shared node pointer.
        self.reconnector = Reconnector(nodes, Backoff(0.05, 2.0), moves=not follows)
        self.conn: Connection | None = None
        self.ready = False  # PUB open in confirm mode, ADMIN open
        self.queue: deque[Outgoing] = deque()  # waiting to be published, in order
        self.tracker = Tracker()
        self.prepared: dict[Any, float] = {}  # prep key -> when it was declared on this connection
        self.preparing: dict[Any, Prep] = {}  # prep key -> prep whose declarations are on the wire
        self._admin: deque[Any] = deque()  # prep keys of the ADMIN calls not yet answered, in order
        self.suspects: set[Outgoing] = set()  # messages to publish alone: one of them closed PUB
        self.sent_at: dict[int, float] = {}  # (stall check) seq -> when published; only with stall_timeout
        self.last_used = 0.0
        self.reconnect_at = 0.0
        self.unreachable_since = 0.0
        self.last_error: MagneError | None = None
        self.closed = False  # close() was called (a stop): no new connection for what is left in line
        self.opened = 0  # connections made (a worker's link reports it)
        self.on_latency: Callable[[float], None] | None = None  # --metrics: confirm latency of each message

    # -- the endpoint ------------------------------------------------------------------------------------
    def busy(self) -> bool:
        return bool(self.queue) or (self.conn is not None and not self.ready)

    def put(self, msg: Outgoing) -> None:
        """Loop thread: queue a message."""
        self.queue.append(msg)

    def pending(self) -> int:
        """Messages not yet confirmed (waiting or on the wire)."""
        return len(self.queue) + len(self.tracker)

    def tick(self, now: float) -> float | None:
        """Connect when there is work, expire deadlines, detect a stalled link, publish, close when idle."""
        wakes: list[float] = []
        self._expire(now)
        conn = self.conn
        if conn is None:
            if not self.queue or self.closed:
                return None
            if now < self.reconnect_at:
                return self.reconnect_at
            self._open(now)
            return now + 0.05
        w = conn.tick(now)
        if w is not None:
            wakes.append(w)
        if self.conn is None:
            return now
        if conn.state is State.CLOSED:
            self._dropped()
            return now if self.queue else None
        if self.stall_timeout and self.sent_at and not conn.blocked:
            oldest = next(iter(self.sent_at.values()))
            if now - oldest > self.stall_timeout:
                raise ConnectionLost(f"{self.name}: no confirm for {now - oldest:.0f}s")
            wakes.append(oldest + self.stall_timeout)
        self.pump(now)
        if self.ready and not self.pending() and not conn.outbox:
            if now - self.last_used > self.idle_close:
                log.info("closing the idle %s connection", self.name, event="sender_idle_close")
                self.ready = False
                conn.close(now)
                return now + 0.1
            wakes.append(self.last_used + self.idle_close + 0.01)
        nearest = self._nearest_deadline()
        if nearest is not None:
            wakes.append(nearest)
        return min(wakes) if wakes else None

    def _nearest_deadline(self) -> float | None:
        d = self.queue[0].deadline if self.queue else math.inf
        oldest = self.tracker.oldest()
        if oldest is not None:
            d = min(d, oldest.deadline)
        return d if d != math.inf else None

    def _open(self, now: float) -> None:
        conn = self.wire(Connection(self.nodes.current, self.name, heartbeat=self.heartbeat))
        self.conn, self.ready, self.last_used = conn, False, now
        self.prepared.clear()
        self.preparing.clear()
        self._admin.clear()
        # The broker numbers the new channel's publishes from 1: so must the tracker. After a polite close (idle, or
        # a stop) it still counted the old connection's, and no confirm ever matched a publish again. Whatever it had
        # not confirmed (nothing, normally) goes back in line first.
        self.queue.extendleft(reversed(self.tracker.lost()))
        self.sent_at.clear()
        try:
            conn.start(now)
        except AMQPError as exc:
            self.failed(exc, now)

    def wire(self, conn: Connection) -> Connection:
        """Set this sender's handlers on a connection (loop thread)."""
        conn.on_open = self._on_open
        conn.on_frame = self._on_frame
        conn.on_content = self._on_return
        conn.on_channel_close = self._on_channel_close
        conn.on_blocked = self._on_blocked
        return conn

    def _on_open(self) -> None:
        conn = self.conn
        assert conn is not None
        conn.call(PUB, commands.Channel.Open(), (commands.Channel.OpenOk,))
        conn.call(PUB, commands.Confirm.Select(), (commands.Confirm.SelectOk,), self._on_ready)
        conn.call(ADMIN, commands.Channel.Open(), (commands.Channel.OpenOk,))

    def _on_ready(self, _frame: Any) -> None:
        self.ready = True
        self.opened += 1
        self.unreachable_since = 0.0
        self.reconnector.opened(time.monotonic())
        log.info("opened the publishing connection (%s) to %s", self.name, self.nodes.current.safe_url(),
                 event="sender_open")
        self.pump(time.monotonic())

    # -- publishing -----------------------------------------------------------------------------------------
    def pump(self, now: float) -> None:
        """Write waiting messages while the window has room, each after its declarations."""
        conn = self.conn
        if conn is None or not self.ready:
            return
        if self.suspects:
            self.suspects = {m for m in self.suspects if not m.settled}  # settled on any path: no longer suspect
        queue, tracker, out, suspects = self.queue, self.tracker, conn.outbox, self.suspects
        fmax = conn.frame_max
        wrote = False
        while queue and len(tracker) < self.window and out.size < MAX_OUTBOX:
            msg = queue[0]
            if msg.settled:
                queue.popleft()
                continue
            if suspects and len(tracker):
                break  # finding a culprit: one message at a time, each after the one before is confirmed
            if msg.preps and not self._ready_for(msg, now):
                break  # its declarations are on the wire; their replies move it on
            queue.popleft()
            if msg.frame_max > fmax:
                try:
                    msg.data, msg.frame_max = reframe(msg.data, fmax), fmax
                except MagneError as exc:
                    msg.settle(exc)
                    continue
            out.write(msg.data)
            seq = tracker.add(msg, (msg.exchange, msg.routing_key, msg.message_id, msg.body_hash))
            if self.stall_timeout or self.on_latency is not None:
                self.sent_at[seq] = now
            wrote = True
            if suspects:
                break
        if wrote:
            self.last_used = now

    def _ready_for(self, msg: Outgoing, now: float) -> bool:
        """Whether every declaration `msg` needs is done on this connection; sends those that are not."""
        ok = True
        for prep in msg.preps:
            at = self.prepared.get(prep.key)
            if at is not None and (prep.ttl is None or now - at < prep.ttl):
                continue
            ok = False
            if prep.key not in self.preparing:
                self._declare(prep)
        return ok

    def _declare(self, prep: Prep) -> None:
        conn = self.conn
        assert conn is not None
        self.preparing[prep.key] = prep
        last = len(prep.methods) - 1
        for i, (method, reply) in enumerate(prep.methods):
            self._admin.append(prep.key)
            conn.call(ADMIN, method, (reply,), (lambda _f, k=prep.key: self._declared(k)) if i == last else self._answered)

    def _answered(self, _frame: Any) -> None:
        self._admin.popleft()

    def _declared(self, key: Any) -> None:
        self._admin.popleft()
        if self.preparing.pop(key, None) is not None:
            self.prepared[key] = time.monotonic()

    # -- frames from the broker ---------------------------------------------------------------------------------
    def _on_frame(self, channel: int, frame: Any) -> None:
        if channel == PUB and isinstance(frame, commands.Basic.Ack | commands.Basic.Nack):
            self._settled(self.tracker.confirm(frame), frame)
            self.pump(time.monotonic())

    def _settled(self, settled: list[tuple[Any, PublishError | None]], frame: Any) -> None:
        if self.sent_at:
            now = time.monotonic()
            tag, multiple = frame.delivery_tag, frame.multiple
            for seq in [s for s in self.sent_at if s <= tag] if multiple else ([tag] if tag in self.sent_at else []):
                sent = self.sent_at.pop(seq)
                if self.on_latency is not None:
                    self.on_latency(now - sent)
        for msg, error in settled:
            self.suspects.discard(msg)
            if isinstance(error, Returned) and not msg.rerouted and any(not p.passive for p in msg.preps):
                # Its queue was deleted under us: declare it again and publish once more.
                msg.rerouted = True
                for p in msg.preps:
                    self.prepared.pop(p.key, None)
                self.queue.appendleft(msg)
                continue
            msg.settle(error)

    def _on_return(self, channel: int, method: Any, header: bytes, body: bytes) -> None:
        if channel == PUB and isinstance(method, commands.Basic.Return):
            try:
                mid = codec.decode_properties(header).message_id
            except Exception:
                mid = None
            self.tracker.returned(method, mid if isinstance(mid, str) else None, body)

    def _on_blocked(self, blocked: bool, reason: str) -> None:
        if blocked:
            log.warning("broker blocked publishing on %s (%s): messages wait", self.name, logs.clean(reason),
                        event="sender_blocked")
        else:
            log.info("broker unblocked publishing on %s; %d messages waiting for their confirm", self.name,
                     len(self.tracker), event="sender_unblocked")

    def _on_channel_close(self, channel: int, exc: ChannelClosed) -> None:
        conn = self.conn
        assert conn is not None
        if channel == ADMIN:
            self._admin_refused(exc)
            conn.call(ADMIN, commands.Channel.Open(), (commands.Channel.OpenOk,))
            return
        # PUB: the broker refused something we published. Nobody is charged yet: the unconfirmed messages go
        # again one at a time; the one that closes the channel alone is the culprit.
        self.ready = False
        lost = self.tracker.lost()
        self.sent_at.clear()
        culprit = lost[0] if len(lost) == 1 else None  # the only one on the wire: nothing else can have caused it
        again = []
        for msg in lost:
            if msg is culprit:
                msg.charged += 1
                if msg.charged >= MAX_CHARGES:
                    self.suspects.discard(msg)
                    msg.settle(PublishError(f"the broker refused the message for {msg.routing_key!r}: {exc.code} "
                                            f"{exc.text}"))
                    continue
            self.suspects.add(msg)
            again.append(msg)
        self.queue.extendleft(reversed(again))
        self.prepared.clear()  # an exchange deleted under us is the common cause: check the declarations again
        log.warning("%s: the broker closed the publishing channel (%s %s); %d unconfirmed messages are published "
                    "again one at a time to find the one it refused", self.name, exc.code, logs.clean(exc.text),
                    len(again), event="sender_channel_closed")
        conn.call(PUB, commands.Channel.Open(), (commands.Channel.OpenOk,))
        conn.call(PUB, commands.Confirm.Select(), (commands.Confirm.SelectOk,), self._on_pub_reopened)

    def _on_pub_reopened(self, _frame: Any) -> None:
        self.ready = True
        self.pump(time.monotonic())

    def _admin_refused(self, exc: ChannelClosed) -> None:
        """A declaration was refused: the oldest unanswered ADMIN call's. Fail the messages that needed it; the
        declarations after it were discarded with the channel and are sent again."""
        culprit = self._admin[0] if self._admin else None
        prep = self.preparing.pop(culprit, None) if culprit is not None else None
        self._admin.clear()
        self.preparing.clear()  # whatever else was in flight is asked again by the next pump
        if prep is None:
            log.warning("%s: the broker closed the declaration channel: %s", self.name, exc, event="sender_admin_closed")
            return
        if prep.passive and exc.code == 404:
            error: PublishError = NoSuchQueue(
                f"queue {prep.what!r} (or its exchange) does not exist: start a worker for its tasks, or pass "
                "--declare (with --queue-type if it must be a quorum queue)")
        else:
            error = PublishError(f"the broker refused to declare {prep.what!r}: {exc.code} {exc.text}")
            if exc.code in (403, 406):
                error.permanent = True
        failed = 0
        keep: deque[Outgoing] = deque()
        for msg in self.queue:
            if any(p.key == culprit for p in msg.preps):
                msg.settle(error)
                failed += 1
            else:
                keep.append(msg)
        self.queue = keep
        log.warning("%s: %s; %d messages that needed it failed, the others go on", self.name, error, failed,
                    event="declaration_refused")

    # -- faults ------------------------------------------------------------------------------------------------
    def failed(self, exc: AMQPError, now: float) -> None:
        """The connection failed: every unconfirmed message goes back in line (no charge: nobody caused a lost
        socket); reconnect by the Reconnector; a permanent error (login, vhost) fails what waits."""
        was_open = self.ready
        lost = self.tracker.lost()
        self.sent_at.clear()
        if self.conn is not None:
            self.conn.abort()
        self.conn, self.ready = None, False
        self.last_error = exc if isinstance(exc, MagneError) else ConnectionLost(str(exc))
        # A 5xx close refused something we sent: charged like a closure of the publish channel (see there).
        refused = isinstance(exc, ConnectionClosed) and 500 <= exc.code < 600
        again = []
        for msg in lost:
            if refused and len(lost) == 1:
                msg.charged += 1
                if msg.charged >= MAX_CHARGES:
                    msg.settle(exc)
                    continue
            if refused:
                self.suspects.add(msg)
            again.append(msg)
        self.queue.extendleft(reversed(again))
        delay, round_failed = self.reconnector.failed(exc, now, was_open)
        self.reconnect_at = now + delay
        if not self.unreachable_since:
            self.unreachable_since = now
        never_opened = self.give_up_after and not self.opened and round_failed  # a first connect: say so at once
        if exc.permanent or never_opened or (self.give_up_after and now - self.unreachable_since >= self.give_up_after):
            self.fail_all(exc)
            self.unreachable_since = 0.0
        log.warning("publishing connection failed (%s, connection lost): %s; %d messages wait, reconnecting in %.1fs",
                    self.name, exc,
                    len(self.queue), delay, event="sender_connection_lost")

    def _dropped(self) -> None:
        """The connection closed politely (idle, or at a stop)."""
        self.conn, self.ready = None, False

    def _expire(self, now: float) -> None:
        """Fail messages past their deadline: the oldest waiting ones and the oldest unconfirmed ones (deadlines
        grow with submission order, so looking at the front is enough)."""
        queue = self.queue
        while queue and (queue[0].settled or queue[0].deadline <= now):
            msg = queue.popleft()
            msg.settle(self._timeout_error(msg, sent=False))
        if self.tracker:
            for msg in self.tracker.drop_oldest_while(lambda m: m.deadline <= now):
                msg.settle(self._timeout_error(msg, sent=True))

    def _timeout_error(self, msg: Outgoing, sent: bool) -> MagneError:
        blocked = self.conn is not None and self.conn.blocked
        why = " (the broker blocks publishing: a memory or disk alarm)" if blocked else ""
        if not sent and self.last_error is not None and self.conn is None:
            return ConnectionLost(f"message to {msg.routing_key!r} not published in time: {self.last_error}")
        what = "no confirm" if sent else "not published"
        return BrokerTimeout(f"{what} for the message to {msg.routing_key!r} in time{why}"
                             + ("; the broker may still take it" if sent else ""))

    def fail_all(self, exc: MagneError) -> None:
        """Fail everything waiting and unconfirmed (a permanent error, the end of the loop)."""
        while self.queue:
            self.queue.popleft().settle(exc)
        for msg in self.tracker.lost():
            msg.settle(exc)
        self.suspects.clear()

    def close(self, now: float) -> None:
        """Polite close without waiting. A blocked connection is dropped instead: during an alarm the broker does
        not read it, so its close-ok would never come. No new connection is made after it."""
        self.closed = True
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
