"""An application's (or a command's) connections to RabbitMQ, on an engine loop of their own.

A `Client` runs one engine loop (magne/engine/loop.py) on its own thread, `magne-publisher`,
with two endpoints, each connecting on first use and reconnecting by its Reconnector:
- a Sender (magne/engine/sender.py): confirmed publishing, declarations on their own channel;
- a Session (magne/engine/session.py): one channel for calls (`call`, `get`, `ack`, `queue_counts`:
  `magne dead`, `magne demo`, `magne status`) and consumers (`consume`: what reads replies,
  results, control messages), subscribed again after a reconnect;
- two more Sessions, each connected only once used: `leases`, for messages held unacked as leases (the
  tokens of magne.gate), and `locks`, for calls that are refused as a matter of course (magne.leader's
  exclusive-queue election gets 405 RESOURCE_LOCKED every second it is not the leader; magne.gate's checks
  get 404s). A refused call closes its session's channel, a closed channel gives back every message it
  held and re-subscribes every consumer on it: leases and other consumers never share a channel with those.
Other threads never touch a socket: they hand messages over through a deque and the loop's
Waker (`publish`, the hot path: one append and at most one wake-up per burst), or submit a call
and wait for its reply (`call`, on a magne.engine.waker.Signal), in slices, so a waiting thread stays interruptible.

A thread sending a message waits for its own outcome (magne.publisher does the waiting); the
client never runs application code on its thread.
"""

from __future__ import annotations

import itertools
import os
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import Any

from pamqp import commands

from magne import logs
from magne.amqp import codec, names
from magne.amqp.errors import BrokerTimeout, ConnectionLost, MagneError, as_publish_error
from magne.amqp.url import Nodes, Params
from magne.engine.connection import State
from magne.engine.loop import Loop
from magne.engine.sender import Outgoing, Sender
from magne.engine.session import CH, Call, Delivered, Session, Subscription
from magne.engine.waker import Signal

log = logs.Log("magne.client")

SLICE = 0.2  # every wait of a calling thread, in slices this long
_TAGS = itertools.count(1)
GIVE_UP_AFTER = 10.0  # messages fail once every node was unreachable this long (each also has its own deadline)


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
        self.leases = Session(nodes, f"{name} (leases)", heartbeat)  # idle (no connection) until used
        self.locks = Session(nodes, f"{name} (locks)", heartbeat)  # idle (no connection) until used
        self.sessions = (self.session, self.leases, self.locks)
        self.loop.endpoints += [self.sender, *self.sessions]
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

    def call(self, method: Any, *replies: type, timeout: float | None = None, session: Session | None = None) -> Any:
        """A synchronous method on the session's channel; its reply. ChannelClosed if the broker refused it
        (the channel opens again for the next call), BrokerTimeout after `timeout`; a method pamqp cannot encode
        raises its TypeError/ValueError at once. Any thread but the loop's."""
        if method is not None:
            codec.encode(CH, method)  # raises here, on the caller's thread, for a method that cannot be encoded
        call = Call(method, replies)
        on = session or self.session
        self.loop.submit(lambda: on.submit(call))
        return self._wait(call, timeout, "/".join(r.__name__ for r in replies))

    def _wait(self, call: Call, timeout: float | None, what: str) -> Any:
        """Wait for `call` in slices (the calling thread stays interruptible)."""
        limit = self.timeout if timeout is None else timeout
        deadline = time.monotonic() + limit
        while not call.signal.wait(SLICE):
            if time.monotonic() >= deadline:
                call.claim.append("gave up")
                if call.claim[0] == "gave up":
                    call.cancelled = True
                    raise BrokerTimeout(f"no {what} from the broker within {limit:g}s")
                call.signal.wait()  # a basic.get-ok came meanwhile and is being handed over: take it (it is held)
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
            raise as_publish_error(outcome[0])

    def publish_copies(self, exchange: str, routing_key: str, properties: commands.Basic.Properties,
                       count: int) -> list[MagneError | None]:
        """`count` empty-bodied copies of one message (magne.gate's tokens), mandatory, in one go; wait for every
        confirm and return each copy's outcome (None: confirmed; else a PublishError). One after another, with
        publish_confirmed, a pool of 100000 tokens took 150 s (1.5 ms each, measured). Any thread but the loop's."""
        header, outcomes, signal = codec.header_payload(properties, 0), [], Signal()

        def done(_m: Outgoing, error: MagneError | None) -> None:  # the loop's thread: one at a time
            outcomes.append(None if error is None else as_publish_error(error))
            if len(outcomes) == count:
                signal.set()

        deadline = time.monotonic() + self.timeout
        self.publish_many([Outgoing(exchange, routing_key, header, b"", None, deadline=deadline, done=done)
                           for _ in range(count)])
        while count and not signal.wait(SLICE):
            if not self.thread.is_alive():
                raise ConnectionLost("the client's loop thread has ended")
        return outcomes

    def get(self, queue: str) -> tuple[int, bytes, bytes] | None:
        """basic.get without auto-ack: (delivery tag, header payload, body), or None when empty."""
        got = self.call(names.BasicGet(queue=queue, no_ack=False), commands.Basic.GetOk, commands.Basic.GetEmpty)
        return None if isinstance(got, commands.Basic.GetEmpty) else got

    def ack(self, tag: int, gen: int | None = None, multiple: bool = False, session: Session | None = None) -> None:
        """Ack a message got with `get` or delivered to a consumer (`gen`: its Delivered.gen; an ack of an older
        channel's tag is dropped). Any thread."""
        data = codec.encode_ack(CH, tag, multiple)
        on = session or self.session
        self.loop.submit(lambda: on.write(data, gen))

    def lease(self, queue: str, timeout: float | None = None) -> tuple[int, int] | None:
        """basic.get on the `leases` session: (delivery tag, channel generation) of a message now held unacked until
        `release`d or acked there, or None when the queue is empty. Any thread but the loop's."""
        call = Call(names.BasicGet(queue=queue, no_ack=False), (commands.Basic.GetOk, commands.Basic.GetEmpty))
        self.loop.submit(lambda: self.leases.submit(call))
        got = self._wait(call, timeout, "get-ok")
        return None if isinstance(got, commands.Basic.GetEmpty) else (got[0], call.gen)

    def release(self, tag: int, gen: int, requeue: bool = True) -> None:
        """Give a leased message back to its queue (basic.nack requeue); dropped if its channel is gone (the broker
        gave it back then). Any thread."""
        data = codec.encode_nack(CH, tag, False, requeue)
        self.loop.submit(lambda: self.leases.write(data, gen))

    def consume(self, queue: str, on_message: Callable[[Delivered], None], prefetch: int = 100,
                arguments: dict[str, Any] | None = None, no_ack: bool = False,
                on_cancel: Callable[[], None] | None = None, timeout: float | None = None) -> str:
        """Consume `queue` (a stream too: arguments={"x-stream-offset": ...}); returns the consumer tag once the
        broker confirmed it (ChannelClosed if it refused, 404 for a queue that does not exist). `on_message` gets
        each message (Delivered) on the client's loop thread, in order, and must not block; ack with
        `ack(m.tag, m.gen)`. The consumer is subscribed again after a reconnect; one whose consume-ok did not come
        within `timeout` is cancelled (BrokerTimeout). Any thread but the loop's."""
        tag = f"magne.{os.getpid()}.{next(_TAGS)}"
        sub = Subscription(tag, queue, on_message, prefetch, arguments, no_ack, on_cancel)
        call = Call(None)
        self.loop.submit(lambda: self.session.subscribe(sub, call))
        try:
            self._wait(call, timeout, "consume-ok")
        except BrokerTimeout:  # nobody learns its tag: never leave it consuming, and subscribed again after reconnects
            self.cancel(tag)
            raise
        return tag

    def cancel(self, tag: str) -> None:
        """Stop a consumer (its unacked messages go back when the channel closes, or with a nack). Any thread."""
        self.loop.submit(lambda: self.session.unsubscribe(tag))

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
            for session in self.sessions:
                if session.conn is not None:
                    session.conn.abort()
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
        for session in self.sessions:
            while session.waiting:
                session.waiting.popleft().finish(error=ConnectionLost("the client is closing"))
        for ep in (s, *self.sessions):
            conn = ep.conn
            if conn is not None and conn.state is State.OPEN:
                ep.close(now)
        return all(ep.conn is None or ep.conn.state is State.CLOSED for ep in (s, *self.sessions))
