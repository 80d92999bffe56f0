"""A client's channel for everything but publishing: synchronous calls, basic.get, and consumers.

An engine endpoint (magne/engine/loop.py) with one connection and one channel, opened on the first
call or subscription and opened again after a fault. Calls (`Call`) come from other threads and
are answered in order (a refused one fails with the broker's ChannelClosed, and the channel opens
again for the next). Consumers (`Subscription`) are what features that read from the broker build
on (a results stream, a control queue, a lease): their messages are handed to `on_message` on the
loop's thread, in order, with the channel generation their tag belongs to; a consumer survives a
reconnect (it is subscribed again on the new channel, with the same tag), and an ack whose tag
belongs to an older channel is dropped, never written on the new one (the broker would close it).

Loop thread only, except Call and Subscription objects, which the calling thread makes.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from typing import Any

from pamqp import commands

from magne import logs
from magne.amqp import codec, names
from magne.amqp.errors import AMQPError, ChannelClosed
from magne.amqp.url import Nodes
from magne.backoff import Backoff
from magne.engine.connection import Connection, State
from magne.engine.reconnect import Reconnector
from magne.engine.waker import Signal

log = logs.Log("magne.client")

CH = 1


class Call:
    """One synchronous call of a waiting thread: the loop's thread fills it and signals."""

    __slots__ = ("method", "replies", "signal", "result", "error", "cancelled", "gen", "claim")

    def __init__(self, method: Any, replies: tuple[type, ...] = ()) -> None:
        self.method, self.replies = method, replies
        self.signal = Signal()
        self.result: Any = None
        self.error: BaseException | None = None
        self.cancelled = False
        self.gen = 0  # the channel generation the reply came on (a basic.get's tag belongs to it)
        # Who settles a basic.get-ok: the loop's thread appends "reply", a waiter that times out "gave up"; the
        # first one in wins (list.append is atomic), so a message got for a caller that left is given back.
        self.claim: list[str] = []

    def finish(self, result: Any = None, error: BaseException | None = None) -> None:
        """The loop's thread."""
        self.result, self.error = result, error
        self.signal.set()


class Delivered:
    """A message of a Subscription: `gen` is the channel generation its tag belongs to (Client.ack takes both)."""

    __slots__ = ("tag", "gen", "header", "body", "redelivered")

    def __init__(self, tag: int, gen: int, header: bytes, body: bytes, redelivered: bool) -> None:
        self.tag, self.gen, self.header, self.body, self.redelivered = tag, gen, header, body, redelivered


class Subscription:
    """A consumer of one queue (or stream). `on_message(Delivered)` runs on the loop's thread and must not block;
    `on_cancel()` when the broker cancels the consumer (its queue was deleted)."""

    __slots__ = ("tag", "queue", "prefetch", "arguments", "on_message", "on_cancel", "no_ack")

    def __init__(self, tag: str, queue: str, on_message: Callable[[Delivered], None], prefetch: int = 100,
                 arguments: dict[str, Any] | None = None, no_ack: bool = False,
                 on_cancel: Callable[[], None] | None = None) -> None:
        self.tag, self.queue, self.on_message, self.prefetch = tag, queue, on_message, prefetch
        self.arguments, self.no_ack, self.on_cancel = arguments or {}, no_ack, on_cancel


class Session:
    """One connection with one channel for calls, gets and consumers (an engine endpoint; loop thread only)."""

    def __init__(self, nodes: Nodes, name: str, heartbeat: int | None) -> None:
        self.nodes, self.name, self.heartbeat = nodes, name, heartbeat
        self.reconnector = Reconnector(nodes, Backoff(0.05, 2.0))
        self.conn: Connection | None = None
        self.open_ch = False
        self.gen = 0  # the channel's generation: delivery tags belong to one
        self.waiting: deque[Call] = deque()
        self.inflight: deque[Call] = deque()
        self.subs: dict[str, Subscription] = {}
        self.unconfirmed: dict[str, Call | None] = {}  # consumer tag -> who waits for its consume-ok
        self.streams_gone: set[str] = set()  # stream consumers we cancelled on this channel (their late messages)
        # A stream's consume-ok comes asynchronously: the replies to methods written after its basic.consume can
        # overtake it (RabbitMQ 3.10), which breaks the in-order reply FIFO (a ProtocolError, a reconnect, the same
        # again: a client with two consumers never came back). So nothing follows a consume until its consume-ok.
        self.consuming: str | None = None  # the consumer tag whose consume-ok is awaited
        self.queued: deque[Subscription] = deque()  # consumers to subscribe after it
        self.reconnect_at = 0.0

    def busy(self) -> bool:
        return bool(self.waiting) or (self.conn is not None and not self.open_ch)

    def submit(self, call: Call) -> None:
        self.waiting.append(call)
        self._pump()

    def write(self, data: bytes, gen: int | None = None) -> None:
        """Frames that expect no reply (acks) on the session's channel, once it is open; dropped if they belong to an
        older channel (`gen`)."""
        if self.conn is not None and self.open_ch and (gen is None or gen == self.gen):
            self.conn.outbox.write(data)

    def subscribe(self, sub: Subscription, call: Call) -> None:
        """Start consuming (now, or once the channel is open); `call` is answered with the consume-ok."""
        self.subs[sub.tag] = sub
        self.unconfirmed[sub.tag] = call
        if self.conn is not None and self.open_ch:
            self._consume(sub)  # else the channel opens for it (tick), and _ready subscribes every consumer

    def unsubscribe(self, tag: str) -> None:
        sub = self.subs.pop(tag, None)
        self.unconfirmed.pop(tag, None)  # a consume given up on before its consume-ok (Client.consume's timeout)
        if sub is not None and self.conn is not None and self.open_ch:
            if sub.arguments and "x-stream-offset" in sub.arguments:
                self.streams_gone.add(tag)
            # Not a call: a stream consumer's cancel-ok can come after the replies to later calls (magne.amqp.protocol
            # _UNASKED); its messages still arriving go back (_content, a consumer we cancelled).
            self.conn.send(CH, commands.Basic.Cancel(consumer_tag=tag))

    def _consume(self, sub: Subscription) -> None:
        conn = self.conn
        assert conn is not None
        self.unconfirmed.setdefault(sub.tag, None)
        if self.consuming is not None:  # one consume at a time (see __init__)
            self.queued.append(sub)
            return
        self.consuming = sub.tag
        conn.call(CH, commands.Basic.Qos(prefetch_count=sub.prefetch), (commands.Basic.QosOk,))
        conn.call(CH, names.BasicConsume(queue=sub.queue, consumer_tag=sub.tag, no_ack=sub.no_ack,
                                         arguments=sub.arguments), (commands.Basic.ConsumeOk,),
                  lambda f, tag=sub.tag: self._consuming(tag, f))

    def _consuming(self, tag: str, frame: Any) -> None:
        call = self.unconfirmed.pop(tag, None)
        if call is not None:
            call.finish(frame)
        if self.consuming == tag:
            self.consuming = None
            while self.queued and self.consuming is None:  # the next consumer, then (once all are) the waiting calls
                sub = self.queued.popleft()
                if self.subs.get(sub.tag) is sub:
                    self._consume(sub)
                elif self.unconfirmed.get(sub.tag) is None:  # cancelled while it waited its turn: nobody waits
                    self.unconfirmed.pop(sub.tag, None)
            self._pump()

    def _unblock(self) -> None:
        """A new channel or none: no consume-ok is awaited any more (_ready subscribes every consumer again)."""
        self.consuming = None
        self.queued.clear()

    def tick(self, now: float) -> float | None:
        if self.conn is None:
            if not self.waiting and not self.subs:
                return None
            if now < self.reconnect_at:
                return self.reconnect_at
            self._open(now)
            return now + 0.05
        wake = self.conn.tick(now)
        if self.conn is not None and self.conn.state is State.CLOSED:
            self.conn, self.open_ch = None, False
        self._pump()
        return wake

    def _open(self, now: float) -> None:
        conn = Connection(self.nodes.current, self.name, heartbeat=self.heartbeat)
        conn.on_open = lambda: conn.call(CH, commands.Channel.Open(), (commands.Channel.OpenOk,), self._ready)
        conn.on_channel_close = self._channel_closed
        conn.on_content = self._content
        conn.on_frame = self._frame
        self.conn, self.open_ch = conn, False
        try:
            conn.start(now)
        except AMQPError as exc:
            self.failed(exc, now)

    def _ready(self, _f: Any) -> None:
        self._unblock()
        self.open_ch = True
        self.gen += 1
        self.streams_gone.clear()  # a new channel: the old one's tags are gone
        self.reconnector.opened(time.monotonic())
        for sub in self.subs.values():  # a new channel: every consumer again, with its own tag
            self._consume(sub)
        self._pump()

    def _pump(self) -> None:
        conn = self.conn
        if conn is None or not self.open_ch or self.consuming is not None:
            return
        while self.waiting:
            call = self.waiting.popleft()
            if call.cancelled:
                continue
            if call.method is None:  # open() or a subscription made while closed: the channel is open now
                call.finish(True)
                continue
            self.inflight.append(call)
            conn.call(CH, call.method, call.replies, self._answer)

    def _answer(self, frame: Any) -> None:
        call = self.inflight.popleft()
        call.gen = self.gen
        call.finish(frame)

    def _content(self, _ch: int, method: Any, header: bytes, body: bytes) -> None:
        """A consumer's message (a hand-decoded basic.deliver), or basic.get-ok content, which answers the head call."""
        if type(method) is tuple:
            ctag = method[0].decode("utf-8", "replace")
            sub = self.subs.get(ctag)
            if sub is not None:
                sub.on_message(Delivered(method[1], self.gen, header, body, method[2]))
            elif self.conn is not None and ctag not in self.streams_gone:  # a consumer we cancelled: its messages
                # go back; not a stream's, which answers a nack with 540 NOT_IMPLEMENTED, closing the connection
                self.conn.outbox.write(codec.encode_nack(CH, method[1], False, True))
            return
        if isinstance(method, commands.Basic.GetOk) and self.inflight and self.conn is not None:
            self.conn.answered(CH)
            call = self.inflight.popleft()
            call.claim.append("reply")
            if call.claim[0] != "reply":  # its caller timed out: nobody will ack or release it, give it back now
                self.conn.outbox.write(codec.encode_nack(CH, method.delivery_tag, False, True))
                return
            call.gen = self.gen
            call.finish((method.delivery_tag, header, body))

    def _frame(self, _ch: int, frame: Any) -> None:
        if isinstance(frame, commands.Basic.CancelOk):  # nothing more comes for it
            self.streams_gone.discard(frame.consumer_tag)
        if isinstance(frame, commands.Basic.Cancel):  # the broker cancelled a consumer: its queue is gone
            sub = self.subs.pop(frame.consumer_tag, None)
            if sub is not None:
                log.warning("the broker cancelled the consumer of %s (queue deleted?)", logs.clean(sub.queue),
                            event="client_consumer_cancelled")
                if sub.on_cancel is not None:
                    sub.on_cancel()

    def _channel_closed(self, _ch: int, exc: ChannelClosed) -> None:
        """The call at the head was refused (a 404 for a queue that does not exist, say): it and those pipelined
        after it fail; the channel opens again for the next call (and its consumers are subscribed again)."""
        self.open_ch = False
        refused = self.consuming  # with a consume-ok awaited, nothing else was sent: it is the one refused
        self._unblock()
        while self.inflight:
            self.inflight.popleft().finish(error=exc)
        kept = {t: c for t, c in self.unconfirmed.items() if refused is not None and t != refused and t in self.subs}
        for tag, call in self.unconfirmed.items():  # a consume the broker refused (no such queue): not tried again
            if tag in kept:  # queued behind the refused one, never sent: subscribed when the channel is open again
                continue
            sub = self.subs.pop(tag, None)
            if call is not None:
                call.finish(error=exc)
            elif sub is not None:  # subscribed again after a reconnect, and refused this time: its owner is told
                log.warning("the broker refused to consume %s again (%s); that consumer is gone",
                            logs.clean(sub.queue), exc, event="client_consumer_refused")
                if sub.on_cancel is not None:
                    sub.on_cancel()
        self.unconfirmed = kept
        assert self.conn is not None
        self.conn.call(CH, commands.Channel.Open(), (commands.Channel.OpenOk,), self._ready)

    def failed(self, exc: AMQPError, now: float) -> None:
        if self.conn is not None:
            self.conn.abort()
        self.conn, self.open_ch = None, False
        self._unblock()
        for call in self.inflight:
            call.finish(error=exc)
        self.inflight.clear()
        delay, round_failed = self.reconnector.failed(exc, now, False)
        self.reconnect_at = now + delay
        if exc.permanent or round_failed:
            while self.waiting:
                self.waiting.popleft().finish(error=exc)
            for tag, call in list(self.unconfirmed.items()):  # a consume not yet confirmed fails with its caller
                if call is not None:
                    self.subs.pop(tag, None)
                    del self.unconfirmed[tag]
                    call.finish(error=exc)
        # Consumers already confirmed are subscribed again once the channel is back (their tags are new then).

    def close(self, now: float) -> None:
        if self.conn is not None:
            self.conn.close(now)
