"""One blocking AMQP client: open (with confirms), rpc, get, publish-and-confirm, close.

Used by the application publisher's I/O thread, `magne dead`, `magne demo` and the
tests' tooling; it drives the same non-blocking `Connection` as the worker's I/O
thread from its own select() loop, so handshake, heartbeats and closes are the same
code. Every wait is bounded by a deadline, and select() is called in slices of at
most SLICE seconds so that an exception raised into the calling thread (a time
limit, a cold stop) is seen promptly: a thread blocked here stays interruptible.

Channel 1 is the client's only channel. A client is used by one thread at a time
(the application publisher gives it to its own I/O thread).

Confirms: with `confirms=True` every publish gets the next sequence number in a
`ConfirmWindow`, which settles it exactly once, by its own number: a
`basic.ack`/`basic.nack` (single or `multiple`) or a `basic.return` followed by the
ack. So many publishes can be in flight at once, and a confirm can never be taken for
another message's (the old "wait for the next ack" could, after an interrupted wait).
"""

from __future__ import annotations

import functools
import select
import struct
import time
from collections import deque
from collections.abc import Callable
from typing import Any

from pamqp import commands
from pamqp import frame as pframe

from magne.amqp import codec
from magne.amqp.errors import BrokerTimeout, ChannelClosed, ConnectionLost, FrameError, PublishError
from magne.amqp.url import Params
from magne.engine.connection import READ, WRITE, Connection, State

CH = 1
SLICE = 0.2


class Nacked(PublishError):
    """The broker refused the message (basic.nack): a reject-publish queue at its length limit, an internal error."""

    reason = "nack"


class Returned(PublishError):
    """The message was unroutable (basic.return of a mandatory publish): no queue is bound for its routing key."""

    reason = "return"

    def __init__(self, text: str, reply_code: int = 312, reply_text: str = "NO_ROUTE") -> None:
        super().__init__(text)
        self.reply_code = reply_code
        self.reply_text = reply_text


# -- hot encoding of a publish ---------------------------------------------------------
_frame_head = struct.Struct(">BHI").pack


@functools.lru_cache(maxsize=4096)
def publish_method(exchange: str, routing_key: str, mandatory: bool = True, channel: int = CH) -> bytes:
    """The basic.publish method frame, the same bytes for every message to one destination: cached, since
    pamqp's marshal costs about 5 us and a bulk publish sends thousands to the same place."""
    return pframe.marshal(commands.Basic.Publish(exchange=exchange, routing_key=routing_key, mandatory=mandatory),
                          channel)


def encode_content(method_frame: bytes, header: bytes, body: bytes, frame_max: int, channel: int = CH) -> bytes:
    """A publish as bytes: the method frame, the content header (`header` is its payload, e.g. from
    codec.header_payload) and the body in frames of at most `frame_max`. What codec.encode_publish makes,
    from a cached method frame (tests/unit/test_publisher_unit.py compares the two)."""
    if len(header) + codec.FRAME_OVERHEAD > frame_max:
        raise FrameError(f"content header of {len(header)} bytes does not fit frame_max {frame_max}")
    chunk = frame_max - codec.FRAME_OVERHEAD
    if len(body) <= chunk:
        if not body:
            return b"".join((method_frame, _frame_head(2, channel, len(header)), header, b"\xce"))
        return b"".join((method_frame, _frame_head(2, channel, len(header)), header, b"\xce",
                         _frame_head(3, channel, len(body)), body, b"\xce"))
    parts = [method_frame, _frame_head(2, channel, len(header)), header, b"\xce"]
    for start in range(0, len(body), chunk):
        piece = body[start : start + chunk]
        parts += (_frame_head(3, channel, len(piece)), piece, b"\xce")
    return b"".join(parts)


class ConfirmWindow:
    """The unconfirmed publishes of one channel in confirm mode: sequence number -> token.

    `add` numbers a publish (the broker numbers them the same way, from 1 per channel);
    `confirm` settles what a basic.ack/basic.nack covers, `returned` marks the publish a
    basic.return is about (RabbitMQ sends it just before that publish's ack), `clear`
    hands back everything unconfirmed when the channel is gone. Each token comes out
    exactly once. Owned by the thread that owns the connection; all operations are O(1)
    per publish (a multiple ack walks the order deque from the front).
    """

    __slots__ = ("_pending", "_order", "_returned", "seq")

    def __init__(self) -> None:
        self.seq = 0  # the last number given
        self._pending: dict[int, tuple[Any, Any]] = {}  # seq -> (token, return key)
        self._order: deque[int] = deque()  # seqs in publish order (some already settled singly)
        self._returned: dict[int, Any] = {}  # seq -> its basic.return, until its ack

    def __len__(self) -> int:
        return len(self._pending)

    def add(self, token: Any, key: Any = None) -> int:
        """Number the next publish. `key` = (exchange, routing key, body) lets a basic.return find it."""
        self.seq += 1
        self._pending[self.seq] = (token, key)
        self._order.append(self.seq)
        return self.seq

    def confirm(self, frame: Any) -> list[tuple[int, Any, PublishError | None]]:
        """Settle by a basic.ack or basic.nack: [(seq, token, None if confirmed else why not)]."""
        tag, pending, out = frame.delivery_tag, self._pending, []
        nack = isinstance(frame, commands.Basic.Nack)
        if frame.multiple:
            order = self._order
            while order and order[0] <= tag:
                seq = order.popleft()
                got = pending.pop(seq, None)
                if got is not None:
                    out.append((seq, got[0], self._outcome(seq, got[1], nack)))
        else:
            got = pending.pop(tag, None)
            if got is not None:
                out.append((tag, got[0], self._outcome(tag, got[1], nack)))
            order = self._order
            while order and order[0] not in pending:  # keep the deque as short as the window
                order.popleft()
        return out

    def _outcome(self, seq: int, key: Any, nack: bool) -> PublishError | None:
        ret = self._returned.pop(seq, None) if self._returned else None
        where = f"{key[1]!r}" if key else "its routing key"
        if ret is not None:
            return Returned(f"message for {where} was unroutable: {ret.reply_code} {ret.reply_text}",
                            ret.reply_code, ret.reply_text)
        if nack:
            return Nacked(f"broker refused the message for {where} (basic.nack)")
        return None

    def returned(self, method: Any, body: bytes) -> bool:
        """Mark the oldest unconfirmed, not yet returned publish with this exchange, routing key and body."""
        want = (method.exchange, method.routing_key, body)
        for seq, (_token, key) in self._pending.items():
            if seq not in self._returned and key == want:
                self._returned[seq] = method
                return True
        return False

    def oldest(self) -> Any:
        """The token of the oldest unconfirmed publish (None when there is none)."""
        for seq in self._order:
            got = self._pending.get(seq)
            if got is not None:
                return got[0]
        return None

    def drop_oldest_while(self, pred: Callable[[Any], bool]) -> list[Any]:
        """Take out, oldest first, the unconfirmed tokens for which `pred` holds, stopping at the first that
        does not (a publisher gives up on overdue ones; a late ack for them then settles nothing)."""
        out = []
        order, pending = self._order, self._pending
        while order:
            got = pending.get(order[0])
            if got is None:
                order.popleft()
                continue
            if not pred(got[0]):
                break
            seq = order.popleft()
            del pending[seq]
            self._returned.pop(seq, None)
            out.append(got[0])
        return out

    def clear(self) -> list[Any]:
        """Every unconfirmed token, in publish order; the window is empty afterwards (a new channel starts at 1)."""
        tokens = [t for t, _k in self._pending.values()]
        self._pending.clear()
        self._order.clear()
        self._returned.clear()
        self.seq = 0
        return tokens


class Client:
    def __init__(self, params: Params, name: str, confirms: bool = False, heartbeat: int = 0,
                 timeout: float = 30.0) -> None:
        self.conn = Connection(params, name, heartbeat=heartbeat)
        self.conn.on_content = self._on_content
        self.conn.on_frame = self._on_frame
        self.conn.on_channel_close = self._on_channel_close
        self.timeout = timeout
        self.confirms = confirms
        self.contents: deque[tuple[Any, bytes, bytes]] = deque()  # (method, header payload, body): get-ok
        self.frames: deque[Any] = deque()  # frames nobody waited for (get-empty, cancel)
        self.window = ConfirmWindow()  # confirm mode: what is unconfirmed
        # Confirm mode: called with (seq, token, None or the PublishError) as each publish is settled. The
        # default keeps the outcome for publish_confirmed; the application publisher's I/O thread sets its own.
        self.on_confirm: Callable[[int, Any, PublishError | None], None] = self._keep_outcome
        self._outcomes: dict[int, PublishError | None] = {}
        self._closed: ChannelClosed | None = None

    @property
    def seq(self) -> int:
        """The confirm sequence number of the last publish on this channel."""
        return self.window.seq

    # -- lifecycle -----------------------------------------------------------------
    def open(self) -> Client:
        self.conn.start(time.monotonic())
        self.pump_until(lambda: self.conn.state is State.OPEN, "the connection to open")
        self.open_channel()
        return self

    def open_channel(self) -> list[Any]:
        """Open channel 1 (again, after the broker closed it), in confirm mode if asked. Returns the tokens
        of the publishes the closed channel never confirmed (they start over: a new channel counts from 1)."""
        lost = self.window.clear()
        self._outcomes.clear()
        self._closed = None
        self.rpc(commands.Channel.Open(), commands.Channel.OpenOk)
        if self.confirms:
            self.rpc(commands.Confirm.Select(), commands.Confirm.SelectOk)
        return lost

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
    def step(self, wait: float, wake_fd: int = -1) -> bool:
        """One turn of the loop: write what the socket takes, run the timers, wait in select() at most `wait`
        seconds for the socket (and `wake_fd`, another thread's wake-up), then read and dispatch.
        Returns whether `wake_fd` was readable. ConnectionLost (or the connection's own error) when it died."""
        conn = self.conn
        now = time.monotonic()
        conn.flush(now)
        wake = conn.tick(now)
        if conn.state is State.CLOSED:
            raise ConnectionLost("the connection is closed")
        if wake is not None:
            wait = min(wait, max(0.0, wake - now))
        ev = conn.events()
        fd = conn.fileno()
        rd = [fd] if ev & READ else []
        if wake_fd >= 0:
            rd.append(wake_fd)
        r, w, _ = select.select(rd, [fd] if ev & WRITE else [], [], max(0.0, wait))
        now = time.monotonic()
        if w:
            conn.on_writable(now)
        if fd in r:
            conn.on_readable(now)
        return wake_fd >= 0 and wake_fd in r

    def pump_until(self, done: Callable[[], bool], what: str, timeout: float | None = None) -> None:
        """Drive the connection until `done()`; BrokerTimeout after `timeout` seconds."""
        limit = self.timeout if timeout is None else timeout
        deadline = time.monotonic() + limit
        while not done():
            if self._closed is not None:
                exc, self._closed = self._closed, None
                raise exc
            now = time.monotonic()
            if now >= deadline:
                raise BrokerTimeout(f"no {what} from the broker within {limit:g}s")
            self.step(min(SLICE, deadline - now))

    def rpc(self, method: Any, *replies: type, timeout: float | None = None) -> Any:
        got: list[Any] = []
        self.conn.call(CH, method, replies, got.append)
        self.pump_until(lambda: bool(got), "/".join(r.__name__ for r in replies), timeout)
        return got[0]

    def _on_content(self, _channel: int, method: Any, header: bytes, body: bytes) -> None:
        if self.confirms and isinstance(method, commands.Basic.Return):
            self.window.returned(method, body)  # its publish's ack follows
            return
        self.contents.append((method, header, body))

    def _on_frame(self, _channel: int, frame: Any) -> None:
        if self.confirms and isinstance(frame, commands.Basic.Ack | commands.Basic.Nack):
            for seq, token, error in self.window.confirm(frame):
                self.on_confirm(seq, token, error)
            return
        self.frames.append(frame)

    def _on_channel_close(self, _channel: int, exc: ChannelClosed) -> None:
        self._closed = exc  # raised from pump_until, outside the decoder

    def take_channel_error(self) -> ChannelClosed | None:
        """The broker's channel.close seen by step() (pump_until raises it instead), once."""
        exc, self._closed = self._closed, None
        return exc

    def _keep_outcome(self, seq: int, _token: Any, error: PublishError | None) -> None:
        self._outcomes[seq] = error

    # -- messages ---------------------------------------------------------------------
    def publish(self, exchange: str, routing_key: str, body: bytes, properties: commands.Basic.Properties | bytes,
                mandatory: bool = False) -> int:
        """Write one message; returns its confirm sequence number (in confirm mode)."""
        data = codec.encode_publish(CH, exchange, routing_key, body, properties, self.conn.frame_max, mandatory)
        return self.write_publish(data, None, (exchange, routing_key, body))

    def write_publish(self, data: bytes, token: Any, key: Any = None) -> int:
        """Write an encoded publish (encode_content); in confirm mode it is numbered in the window with `token`,
        which `on_confirm` gets back. `key` = (exchange, routing key, body) matches a basic.return to it."""
        self.conn.outbox.write(data)
        if self.confirms:
            return self.window.add(token, key)
        return 0

    def publish_confirmed(self, exchange: str, routing_key: str, body: bytes,
                          properties: commands.Basic.Properties | bytes, timeout: float | None = None) -> None:
        """Publish mandatory and wait for this message's own confirm; PublishError if nacked or unroutable."""
        assert self.confirms, "publish_confirmed needs a client opened with confirms=True"
        seq = self.publish(exchange, routing_key, body, properties, mandatory=True)
        self.pump_until(lambda: seq in self._outcomes, f"confirm for the message to {routing_key!r}", timeout)
        error = self._outcomes.pop(seq)
        if error is not None:
            raise error

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
