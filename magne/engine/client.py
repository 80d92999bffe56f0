"""An application's (or a command's) connections to RabbitMQ, on an engine loop of their own.

A `Client` runs one engine loop (magne/engine/loop.py) on its own thread, `magne-publisher`,
with two endpoints, each connecting on first use and reconnecting by its Reconnector:
- a Sender (magne/engine/sender.py): confirmed publishing, declarations on their own channel;
- a Session: one channel for the calls of commands and tools (`call`, `get`, `ack`,
  `queue_counts`): `magne dead`, `magne demo`, `magne status`.
Other threads never touch a socket: they hand messages over through a deque and the loop's
Waker (`publish`, the hot path: one append and at most one wake-up per burst), or submit a call
and wait for its reply (`call`, on a magne.engine.waker.Signal), in slices, so a waiting thread stays interruptible.

A thread sending a message waits for its own outcome (magne.publisher does the waiting); the
client never runs application code on its thread.
"""

from __future__ import annotations

import os
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import Any

from pamqp import commands

from magne import logs
from magne.amqp import codec, names
from magne.amqp.errors import AMQPError, BrokerTimeout, ChannelClosed, ConnectionLost, MagneError
from magne.amqp.url import Nodes, Params
from magne.backoff import Backoff
from magne.engine.connection import Connection, State
from magne.engine.loop import Loop
from magne.engine.reconnect import Reconnector
from magne.engine.sender import Outgoing, Sender
from magne.engine.waker import Signal

log = logs.Log("magne.client")

SLICE = 0.2  # every wait of a calling thread, in slices this long
GIVE_UP_AFTER = 10.0  # messages fail once every node was unreachable this long (each also has its own deadline)
CH = 1


class Call:
    """One synchronous call of a waiting thread: the loop's thread fills it and signals."""

    __slots__ = ("method", "replies", "signal", "result", "error", "cancelled")

    def __init__(self, method: Any, replies: tuple[type, ...] = ()) -> None:
        self.method, self.replies = method, replies
        self.signal = Signal()
        self.result: Any = None
        self.error: BaseException | None = None
        self.cancelled = False

    def finish(self, result: Any = None, error: BaseException | None = None) -> None:
        """The loop's thread."""
        self.result, self.error = result, error
        self.signal.set()


class Session:
    """One connection with one channel for synchronous calls (an engine endpoint; loop thread only)."""

    def __init__(self, nodes: Nodes, name: str, heartbeat: int | None) -> None:
        self.nodes, self.name, self.heartbeat = nodes, name, heartbeat
        self.reconnector = Reconnector(nodes, Backoff(0.05, 2.0))
        self.conn: Connection | None = None
        self.open_ch = False
        self.waiting: deque[Call] = deque()
        self.inflight: deque[Call] = deque()

    def busy(self) -> bool:
        return bool(self.waiting) or (self.conn is not None and not self.open_ch)

    def submit(self, call: Call) -> None:
        self.waiting.append(call)
        self._pump()

    def write(self, data: bytes) -> None:
        """Frames that expect no reply (acks) on the session's channel, once it is open."""
        if self.conn is not None and self.open_ch:
            self.conn.outbox.write(data)

    def tick(self, now: float) -> float | None:
        if self.conn is None:
            if not self.waiting:
                return None
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
        self.conn, self.open_ch = conn, False
        try:
            conn.start(now)
        except AMQPError as exc:
            self.failed(exc, now)

    def _ready(self, _f: Any) -> None:
        self.open_ch = True
        self.reconnector.opened(time.monotonic())
        self._pump()

    def _pump(self) -> None:
        conn = self.conn
        if conn is None or not self.open_ch:
            return
        while self.waiting:
            call = self.waiting.popleft()
            if call.cancelled:
                continue
            if call.method is None:  # open(): the channel is open, that is all it asked
                call.finish(True)
                continue
            self.inflight.append(call)
            conn.call(CH, call.method, call.replies, self._answer)

    def _answer(self, frame: Any) -> None:
        self.inflight.popleft().finish(frame)

    def _content(self, _ch: int, method: Any, header: bytes, body: bytes) -> None:
        """basic.get-ok comes with its message, through the content path: it answers the call at the head."""
        if isinstance(method, commands.Basic.GetOk) and self.inflight and self.conn is not None:
            self.conn.answered(CH)
            self.inflight.popleft().finish((method.delivery_tag, header, body))

    def _channel_closed(self, _ch: int, exc: ChannelClosed) -> None:
        """The call at the head was refused (a 404 for a queue that does not exist, say): it and those pipelined
        after it fail; the channel opens again for the next call."""
        self.open_ch = False
        while self.inflight:
            self.inflight.popleft().finish(error=exc)
        assert self.conn is not None
        self.conn.call(CH, commands.Channel.Open(), (commands.Channel.OpenOk,), self._ready)

    def failed(self, exc: AMQPError, now: float) -> None:
        if self.conn is not None:
            self.conn.abort()
        self.conn, self.open_ch = None, False
        for call in self.inflight:
            call.finish(error=exc)
        self.inflight.clear()
        if exc.permanent or self.reconnector.failed(exc, now, False)[1]:
            while self.waiting:
                self.waiting.popleft().finish(error=exc)

    def close(self, now: float) -> None:
        if self.conn is not None:
            self.conn.close(now)


class Client:
    """Thread-safe. `params`: one node or several (a cluster). `heartbeat` None: the URL's."""

    def __init__(self, nodes: Nodes | Params | list[Params], name: str = "magne client", heartbeat: int | None = None,
                 window: int = 1000, timeout: float = 30.0) -> None:
        if isinstance(nodes, Params):
            nodes = Nodes([nodes], start=0)
        elif isinstance(nodes, list):
            nodes = Nodes(nodes)
        self.nodes = nodes
        self.timeout = timeout
        self.loop = Loop()
        self.sender = Sender(nodes, name, heartbeat, window=window, give_up_after=GIVE_UP_AFTER)
        self.session = Session(nodes, f"{name} (calls)", heartbeat)
        self.loop.endpoints += [self.sender, self.session]
        self.requests: deque[Outgoing] = deque()  # sending threads append; the loop thread moves them to the sender
        self.room: deque[tuple[int, Callable[[], None]]] = deque()  # (limit, callback): senders waiting for room
        self.sleeping = False
        self._stopping = False
        self._closed = threading.Event()
        self._pid = os.getpid()
        self.thread = threading.Thread(target=self._main, name="magne-publisher", daemon=True)
        self.thread.start()

    # -- any thread ------------------------------------------------------------------------------------------
    @property
    def alive(self) -> bool:
        return self.thread.is_alive() and self._pid == os.getpid()

    def publish(self, msg: Outgoing) -> None:
        """Hand a message to the loop (it settles it through msg.done). Any thread."""
        self.requests.append(msg)
        if self.sleeping:
            self.sleeping = False
            self.loop.wake()

    def publish_many(self, msgs: list[Outgoing]) -> None:
        self.requests.extend(msgs)
        if self.sleeping:
            self.sleeping = False
            self.loop.wake()

    def has_room(self, limit: int) -> bool:
        """Whether fewer than `limit` messages are waiting or unconfirmed (a sender's backpressure)."""
        return len(self.requests) + self.sender.pending() < limit

    def when_room(self, limit: int, callback: Callable[[], None]) -> None:
        """Call `callback` on the loop's thread once fewer than `limit` messages are outstanding (an asyncio
        sender's backpressure: the callback wakes its event loop). Any thread."""
        self.room.append((limit, callback))
        self.loop.wake()

    def call(self, method: Any, *replies: type, timeout: float | None = None) -> Any:
        """A synchronous method on the session's channel; its reply. ChannelClosed if the broker refused it
        (the channel opens again for the next call), BrokerTimeout after `timeout`; a method pamqp cannot encode
        raises its TypeError/ValueError at once. Any thread but the loop's."""
        if method is not None:
            codec.encode(CH, method)  # raises here, on the caller's thread, for a method that cannot be encoded
        call = Call(method, replies)
        self.loop.submit(lambda: self.session.submit(call))
        limit = self.timeout if timeout is None else timeout
        deadline = time.monotonic() + limit
        while not call.signal.wait(SLICE):
            if time.monotonic() >= deadline:
                call.cancelled = True
                raise BrokerTimeout(f"no {'/'.join(r.__name__ for r in replies)} from the broker within {limit:g}s")
            if not self.thread.is_alive():
                raise ConnectionLost("the client's loop thread has ended")
        if call.error is not None:
            raise call.error
        return call.result

    rpc = call

    def open(self) -> Client:
        """Connect the session now (a command wants a wrong password or an unreachable broker said at once, not
        at its first call). Raises what the connection failed with (after trying every node once)."""
        self.call(None)
        return self

    def publish_confirmed(self, exchange: str, routing_key: str, body: bytes,
                          properties: commands.Basic.Properties | bytes, timeout: float | None = None) -> None:
        """Publish one message, mandatory, and wait for its confirm; PublishError if nacked or unroutable."""
        header = properties if isinstance(properties, bytes) else codec.header_payload(properties, len(body))
        # The id a basic.return of it will carry (the tracker matches the return on it): the header's own.
        mid = (codec.decode_properties(header) if isinstance(properties, bytes) else properties).message_id
        mid = mid if isinstance(mid, str) else None
        signal, outcome = Signal(), []

        def done(_m: Outgoing, error: MagneError | None) -> None:
            outcome.append(error)
            signal.set()

        limit = self.timeout if timeout is None else timeout
        self.publish(Outgoing(exchange, routing_key, header, body, mid, deadline=time.monotonic() + limit, done=done))
        while not signal.wait(SLICE):
            if not self.thread.is_alive():
                raise ConnectionLost("the client's loop thread has ended")
        if outcome[0] is not None:
            raise outcome[0]

    def get(self, queue: str) -> tuple[int, bytes, bytes] | None:
        """basic.get without auto-ack: (delivery tag, header payload, body), or None when empty."""
        got = self.call(names.BasicGet(queue=queue, no_ack=False), commands.Basic.GetOk, commands.Basic.GetEmpty)
        return None if isinstance(got, commands.Basic.GetEmpty) else got

    def ack(self, tag: int) -> None:
        """Ack a message got with `get` (on the session's channel, where its tag belongs)."""
        data = codec.encode_ack(CH, tag, False)
        self.loop.submit(lambda: self.session.write(data))

    def queue_counts(self, queue: str) -> tuple[int, int]:
        """(ready messages, consumers) of an existing queue (passive declare; ChannelClosed 404 if there is none)."""
        ok = self.call(names.QueueDeclare(queue=queue, passive=True), commands.Queue.DeclareOk)
        return ok.message_count, ok.consumer_count

    def submit(self, fn: Callable[[], None]) -> None:
        self.loop.submit(fn)

    def close(self, timeout: float | None = None) -> None:
        """Let the sender settle what is in flight (up to `timeout`), close politely, end the thread. Any thread."""
        self._stopping = True
        self.loop.wake()
        self.thread.join(self.timeout + 5.0 if timeout is None else timeout)

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()

    # -- the loop's thread ---------------------------------------------------------------------------------------
    def _main(self) -> None:
        try:
            self.loop.run(self._turn)
        except BaseException as exc:  # a bug: never leave a sender waiting for an outcome that cannot come
            log.error("the client's loop thread failed: %r", exc, event="client_failed")
            self.sender.fail_all(MagneError(f"the client's loop thread failed: {exc!r}"))
        finally:
            self.sender.abort()
            if self.session.conn is not None:
                self.session.conn.abort()
            self._closed.set()

    def _turn(self, now: float) -> bool:
        requests, sender = self.requests, self.sender
        if requests:
            while requests:
                sender.queue.append(requests.popleft())
            # A message handed over while the client closes: it connects again for it (it ends only once nothing is
            # pending), unlike a worker's link, which stays closed after Sender.close().
            sender.closed = False
            sender.pump(now)  # not connected yet: the sender is busy() and its timers connect it
        room = self.room
        while room and self.has_room(room[0][0]):
            try:
                room.popleft()[1]()
            except Exception:  # its event loop is closed (an asyncio.run() that ended): nobody waits any more
                pass
        self.sleeping = True
        if requests:  # appended after we looked: go round again without sleeping
            self.sleeping = False
            self.loop.wake()
        if self._stopping:
            return self._stop_step(now)
        return False

    def _stop_step(self, now: float) -> bool:
        s = self.sender
        if s.pending():
            return False  # settle what is in flight first (each message has its deadline)
        while self.session.waiting:
            self.session.waiting.popleft().finish(error=ConnectionLost("the client is closing"))
        for ep in (s, self.session):
            conn = ep.conn
            if conn is not None and conn.state is State.OPEN:
                ep.close(now)
        return all(ep.conn is None or ep.conn.state is State.CLOSED for ep in (s, self.session))
