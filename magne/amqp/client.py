"""One blocking AMQP client: open (with confirms), rpc, get, publish-and-confirm, close.

Used by the application publisher, `magne dead`, `magne demo` and the tests'
tooling; it drives the same non-blocking `Connection` as the I/O thread from its
own select() loop, so handshake, heartbeats and closes are the same code. Every
wait is bounded by a deadline, and select() is called in slices of at most
SLICE seconds so that an exception raised into the calling thread (a time limit,
a cold stop) is seen promptly: a thread blocked here stays interruptible.

Channel 1 is the client's only channel. A client is used by one thread at a time
(the publisher serialises its users).
"""

from __future__ import annotations

import select
import time
from collections import deque
from collections.abc import Callable
from typing import Any

from pamqp import commands

from magne.amqp import codec
from magne.amqp.connection import READ, WRITE, Connection, State
from magne.amqp.errors import BrokerTimeout, ChannelClosed, ConnectionLost, PublishError
from magne.amqp.url import Params

CH = 1
SLICE = 0.2


class Client:
    def __init__(self, params: Params, name: str, confirms: bool = False, heartbeat: int = 0,
                 timeout: float = 30.0) -> None:
        self.conn = Connection(params, name, heartbeat=heartbeat)
        self.conn.on_content = self._on_content
        self.conn.on_frame = self._on_frame
        self.conn.on_channel_close = self._on_channel_close
        self.timeout = timeout
        self.confirms = confirms
        self.contents: deque[tuple[Any, bytes, bytes]] = deque()  # (method, header payload, body): get-ok, return
        self.frames: deque[Any] = deque()  # frames nobody waited for (acks, nacks, get-empty, cancel)
        self.seq = 0  # publish sequence number in confirm mode
        self._closed: ChannelClosed | None = None

    # -- lifecycle -----------------------------------------------------------------
    def open(self) -> Client:
        self.conn.start(time.monotonic())
        self.pump_until(lambda: self.conn.state is State.OPEN, "the connection to open")
        self.rpc(commands.Channel.Open(), commands.Channel.OpenOk)
        if self.confirms:
            self.rpc(commands.Confirm.Select(), commands.Confirm.SelectOk)
        return self

    def close(self) -> None:
        """Polite close, bounded; never raises."""
        try:
            self.conn.close(time.monotonic())
            self.pump_until(lambda: self.conn.state is State.CLOSED, "close-ok", timeout=2.0)
        except Exception:
            pass
        self.conn.abort()

    def __enter__(self) -> Client:
        return self.open()

    def __exit__(self, *_exc: object) -> None:
        self.close()

    # -- the loop -------------------------------------------------------------------
    def pump_until(self, done: Callable[[], bool], what: str, timeout: float | None = None) -> None:
        """Drive the connection until `done()`; ConnectionLost after `timeout` seconds."""
        conn = self.conn
        deadline = time.monotonic() + (self.timeout if timeout is None else timeout)
        while not done():
            if self._closed is not None:
                exc, self._closed = self._closed, None
                raise exc
            now = time.monotonic()
            if now >= deadline:
                raise BrokerTimeout(f"no {what} from the broker within {self.timeout if timeout is None else timeout:g}s")
            conn.flush(now)
            wake = conn.tick(now)
            if conn.state is State.CLOSED:
                raise ConnectionLost("the connection is closed")
            wait = min(SLICE, deadline - now, max(0.0, wake - now) if wake is not None else SLICE)
            ev = conn.events()
            fd = conn.fileno()
            r, w, _ = select.select([fd] if ev & READ else [], [fd] if ev & WRITE else [], [], wait)
            now = time.monotonic()
            if w:
                conn.on_writable(now)
            if r:
                conn.on_readable(now)

    def rpc(self, method: Any, *replies: type, timeout: float | None = None) -> Any:
        got: list[Any] = []
        self.conn.call(CH, method, replies, got.append)
        self.pump_until(lambda: bool(got), "/".join(r.__name__ for r in replies), timeout)
        return got[0]

    def _on_content(self, _channel: int, method: Any, header: bytes, body: bytes) -> None:
        self.contents.append((method, header, body))

    def _on_frame(self, _channel: int, frame: Any) -> None:
        self.frames.append(frame)

    def _on_channel_close(self, _channel: int, exc: ChannelClosed) -> None:
        self._closed = exc  # raised from pump_until, outside the decoder

    # -- messages ---------------------------------------------------------------------
    def publish(self, exchange: str, routing_key: str, body: bytes, properties: commands.Basic.Properties | bytes,
                mandatory: bool = False) -> int:
        """Write one message; returns its confirm sequence number (in confirm mode)."""
        self.conn.outbox.write(codec.encode_publish(CH, exchange, routing_key, body, properties,
                                                    self.conn.frame_max, mandatory))
        self.seq += 1
        return self.seq

    def publish_confirmed(self, exchange: str, routing_key: str, body: bytes,
                          properties: commands.Basic.Properties | bytes, timeout: float | None = None) -> None:
        """Publish mandatory and wait for this message's own confirm; PublishError if nacked or unroutable."""
        assert self.confirms, "publish_confirmed needs a client opened with confirms=True"
        seq = self.publish(exchange, routing_key, body, properties, mandatory=True)
        returned: list[Any] = []

        def confirmed() -> bool:
            while self.contents:
                method, _h, _b = self.contents.popleft()
                if isinstance(method, commands.Basic.Return):
                    returned.append(method)
            for f in list(self.frames):
                if isinstance(f, commands.Basic.Ack | commands.Basic.Nack) and (
                        f.delivery_tag == seq or (f.multiple and f.delivery_tag >= seq)):
                    self.frames.remove(f)
                    if isinstance(f, commands.Basic.Nack):
                        raise PublishError(f"broker refused the message for {routing_key!r} (basic.nack)")
                    return True
            return False

        self.pump_until(confirmed, f"confirm for the message to {routing_key!r}", timeout)
        if returned:
            r = returned[0]
            raise PublishError(f"message for {routing_key!r} was unroutable: {r.reply_code} {r.reply_text}")

    def get(self, queue: str) -> tuple[int, bytes, bytes] | None:
        """basic.get without auto-ack: (delivery tag, header payload, body), or None when empty."""
        self.conn.send(CH, commands.Basic.Get(queue=queue, no_ack=False))
        found: list[Any] = []

        def answered() -> bool:
            if self.contents:
                found.append(self.contents.popleft())
                return True
            for f in list(self.frames):
                if isinstance(f, commands.Basic.GetEmpty):
                    self.frames.remove(f)
                    found.append(None)
                    return True
            return False

        self.pump_until(answered, "basic.get answer")
        if found[0] is None:
            return None
        method, header, body = found[0]
        return method.delivery_tag, header, body

    def ack(self, tag: int) -> None:
        self.conn.outbox.write(codec.encode_ack(CH, tag, False))
        self.conn.flush(time.monotonic())

    def queue_counts(self, queue: str) -> tuple[int, int]:
        """(ready messages, consumers) of an existing queue (passive declare; 404 closes the channel)."""
        ok = self.rpc(commands.Queue.Declare(queue=queue, passive=True), commands.Queue.DeclareOk)
        return ok.message_count, ok.consumer_count
