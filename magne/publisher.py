"""Confirmed publishing for applications (`task.send`, `send_many`, `send_async`) and the CLI: the public API.

Every message is published mandatory with publisher confirms; a send returns (or its future completes) only
once the broker confirmed that very message, and raises a `magne.PublishError` (or reports it, for a batch)
when the broker nacked it, returned it as unroutable, or the confirm did not come in time. Arguments that can
never be sent (not JSON, a negative or NaN delay) raise TypeError/ValueError before anything is sent.

Underneath is the engine (magne/engine/client.py): one connection per publisher per process, driven by its
own loop thread `magne-publisher`; application threads and event loops never touch the socket. A sending
thread makes its message (magne.outgoing: body, header, declarations), hands it over through a deque and the
loop's waker, and waits for its own outcome on a Signal, in slices of 0.2 s, holding no lock: a thread
interrupted while it waits (a time limit raised into a task that was sending) only stops waiting, and its
message is still settled by its own confirm. N threads sending at once have their confirms in flight together;
a bulk send is one pipelined stream, at most two windows of messages outstanding; an asyncio send waits for
room the same way and is completed through `loop.call_soon_threadsafe`.

Faults (magne/engine/sender.py): a lost connection republishes what was unconfirmed on the next connection
(to the next node of a cluster): a duplicate is possible, a loss is not; a declaration the broker refuses
fails only the messages that needed it; a queue deleted under a long-lived sender is declared again.

Fork safety: a child of a process that used a publisher (gunicorn, multiprocessing with fork) starts with an
empty publisher: the parent's sockets are closed in the child (engine/connection.py's at-fork hook: close(),
never shutdown(), which would cut the parent's connection), and the child's first send opens its own.
"""

from __future__ import annotations

import asyncio
import os
import threading
import time
import weakref
from collections import deque
from collections.abc import Awaitable, Iterable
from typing import Any

from pamqp import commands

from magne import wire
from magne.amqp import codec
from magne.amqp.confirms import Nacked, Returned
from magne.amqp.errors import BrokerTimeout, FrameError
from magne.amqp.protocol import DEFAULT_FRAME_MAX
from magne.amqp.url import Nodes, parse_urls
from magne.engine.client import Client
from magne.engine.sender import NoSuchQueue, Outgoing
from magne.outgoing import (
    BatchResult,
    Failed,
    Message,
    Target,
    TaskLike,
    check_delay,
    delay_prep,
    json_header,
    preps_for,
    raised,
    task_header,
)
from magne.waiters import Async, Batch, One

__all__ = ["BatchResult", "Failed", "Message", "Nacked", "NoSuchQueue", "Publisher", "Returned", "Target", "configure",
           "default_publisher", "json_header", "set_default"]

SLICE = 0.2  # every wait of a sending thread, in slices this long
# Unconfirmed messages on the wire at once. send_many of 20,000 here, medians of 3: window 256 -> 19.0k/s,
# 1,000 -> 19.9k/s, 4,000 -> 21.0k/s: the broker is the limit by then; 1,000 keeps a batch's memory small.
WINDOW = 1000
BATCH_STEP = 64  # a batch hands messages over this many at a time
GRACE = 5.0  # a sender waits this long past the confirm timeout without progress before giving up on the loop


_publishers: weakref.WeakSet[Publisher] = weakref.WeakSet()


class Publisher:
    """Publishes with confirms through its own engine loop; thread-safe, usable from asyncio, fork-safe.

    `window`: unconfirmed messages in flight at once. `confirm_timeout`: seconds a message may wait for its
    confirm (queued, being republished, or blocked by a broker alarm) before it fails.
    """

    def __init__(self, url: str | list[str] | None = None, queue_type: str = "classic", confirm_timeout: float = 30.0,
                 window: int = WINDOW) -> None:
        # One or several broker URLs (the nodes of a cluster, ',' or ';' separated, or a list): the connection opens
        # on one of them and moves to the next when it fails (magne.amqp.url.Nodes).
        self.nodes = Nodes(parse_urls(url))
        self.params = self.nodes.current
        self.queue_type = queue_type
        self.confirm_timeout = confirm_timeout
        self.window = max(1, window)
        self._lock = threading.Lock()  # starting and stopping the client only: never held while waiting
        self._preps: dict[Any, Any] = {}
        # What frames are encoded for until the broker says otherwise: what we will ask for (the broker may
        # negotiate less: the sender then frames them again).
        self._frame_max = self.params.frame_max or DEFAULT_FRAME_MAX
        self._pid = os.getpid()
        self._client: Client | None = None
        # send_async calls waiting for room, per event loop: (future, task, args, ...), not encoded messages.
        self._backlogs: dict[asyncio.AbstractEventLoop, deque[tuple[Any, ...]]] = {}
        _publishers.add(self)

    # -- the client's lifecycle ------------------------------------------------------------------------------------
    def _running(self) -> Client:
        """The client, started on first use. Any sending thread; takes the start lock only when there is none."""
        client = self._client
        if client is not None and client.alive:
            return client
        if self._pid != os.getpid():  # forked without the at-fork hook (a fork from C): nothing of the parent's
            self._forget_parent()
        while not self._lock.acquire(timeout=SLICE):
            pass  # bounded slices: the holder only starts a thread, but a sender stays interruptible
        try:
            client = self._client
            if client is None or not client.alive:
                client = self._client = Client(self.nodes, "magne publisher", window=self.window,
                                               timeout=self.confirm_timeout)
            return client
        finally:
            self._lock.release()

    def _forget_parent(self) -> None:
        """In a fork's child: drop the parent's client without touching the parent's connection."""
        client, self._client = self._client, None
        self._lock = threading.Lock()  # the parent's may have been held by a thread that does not exist here
        self._backlogs = {}  # the parent's event loops are not this process's
        self._pid = os.getpid()
        if client is not None:
            client.loop.waker.close()

    def close(self) -> None:
        """Let the client settle what is in flight (up to confirm_timeout), close the connection, end the thread.
        A later send starts a new one. Any thread."""
        if self._pid != os.getpid():
            self._forget_parent()
            return
        client, self._client = self._client, None
        if client is not None:
            client.close(self.confirm_timeout + GRACE)

    # -- making messages --------------------------------------------------------------------------------------------
    def _make(self, queue: str, body: bytes, header: bytes, mid: str | None, exchange: str | None, delay: float | None,
              queue_type: str | None, declare: bool, max_priority: int | None = None) -> Outgoing:
        qtype = queue_type or self.queue_type
        delay = check_delay(delay)
        preps = ()
        routing_key = queue
        if exchange is None:
            preps = preps_for(queue, qtype, declare, max_priority, self._preps)
            exchange = queue
        if delay:
            # Wait on the broker: a TTL queue that dead-letters into the task queue (the same declaration as the
            # worker's retry delays, so the two never disagree).
            routing_key, dprep = delay_prep(queue, delay, qtype)
            preps += (dprep,)
            exchange = ""
        try:
            return Outgoing(exchange, routing_key, header, body, mid, preps, time.monotonic() + self.confirm_timeout,
                            self._frame_max)
        except FrameError as exc:  # a header over frame_max: an argument that can never be sent, not a lost connection
            raise ValueError(f"{exc} (the message's properties are too large to send)") from None

    def _task_message(self, task: TaskLike, args: Any, kwargs: dict[str, Any] | None, delay: float | None, mid: str,
                      declare: bool, priority: int | None = None, headers: dict[str, Any] | None = None) -> Outgoing:
        """A task run in the wire format (docs/wire-format.md). The sending thread."""
        body = wire.encode(task.name, args, kwargs, mid)
        if priority is None:
            priority = getattr(task, "priority", None)
        return self._make(task.queue, body, task_header(task, mid, len(body), priority, headers), mid, None, delay,
                          task.queue_type, declare, getattr(task, "max_priority", None))

    def _from_message(self, m: Message) -> Outgoing:
        mid = m.properties.message_id  # None when it has none: what a basic.return of it carries (its tracker key)
        return self._make(m.queue, m.body, codec.header_payload(m.properties, len(m.body)),
                          mid if isinstance(mid, str) else None, m.exchange, m.delay, m.queue_type, m.declare)

    # -- sending: blocking --------------------------------------------------------------------------------------------
    def publish(self, queue: str, body: bytes, properties: commands.Basic.Properties, exchange: str | None = None,
                delay: float | None = None, queue_type: str | None = None, declare: bool = True) -> None:
        """Publish to `queue` (through its exchange, or after `delay` seconds on the broker) and wait for the confirm.

        `exchange` given: publish there with routing key `queue`, declaring nothing. `declare=False` publishes
        only to a queue that exists (checked once per connection, passively) and raises NoSuchQueue otherwise:
        what `magne send` does, so that a typo never creates broker objects.
        Any application thread; blocks (interruptibly) until the confirm."""
        self._wait_one(self._from_message(Message(queue, body, properties, exchange, delay, queue_type, declare)))

    def send(self, task: TaskLike, args: Any = (), kwargs: dict[str, Any] | None = None, delay: float | None = None,
             message_id: str | None = None, declare: bool = True, priority: int | None = None,
             headers: dict[str, Any] | None = None) -> str:
        """Publish one run of `task` and wait for its confirm; returns its message id. `declare` as in publish;
        `priority` overrides the task's; `headers`: magne's own (magne.workflow). Any application thread; blocks."""
        mid = message_id or wire.new_id()
        self._wait_one(self._task_message(task, args, kwargs, delay, mid, declare, priority, headers))
        return mid

    def _wait_one(self, msg: Outgoing) -> None:
        """Hand `msg` over and wait for its outcome in slices. The sending thread."""
        waiter = One()
        msg.done = waiter
        client = self._running()
        client.publish(msg)
        while not waiter.signal.wait(SLICE):
            if not client.alive:  # closed by another thread meanwhile: the next client takes it over
                client = self._running()
                if not waiter.done and not msg.settled:
                    client.publish(msg)
            if not waiter.done and time.monotonic() > msg.deadline + GRACE:
                raise raised(BrokerTimeout(f"no outcome for the message to {msg.routing_key!r} within "
                                           f"{self.confirm_timeout + GRACE:g}s (the publisher's loop is stuck)"))
        if waiter.error is not None:
            raise raised(waiter.error)

    # -- sending: many at once ---------------------------------------------------------------------------------------
    def send_many(self, items: Iterable[tuple[Any, ...]], declare: bool = True) -> BatchResult:
        """Publish a batch of task runs, pipelined, and wait for every confirm.

        `items`: (task, args) or (task, args, kwargs) tuples, tasks mixed freely (a magne.Task or a Target).
        Returns a BatchResult: the message ids in input order and exactly which messages failed (nacked,
        returned as unroutable, or lost) and why. Encodes lazily and keeps at most two windows of messages
        outstanding, so an iterator of millions does not sit in memory.
        Any application thread; blocks (interruptibly) until every message is settled."""

        def make() -> Iterable[Outgoing]:
            for item in items:
                yield self._task_message(item[0], item[1], item[2] if len(item) > 2 else None, None, wire.new_id(),
                                         declare)

        return self._batch(make())

    def publish_many(self, messages: Iterable[Message]) -> BatchResult:
        """Publish a batch of arbitrary messages (each as Publisher.publish would), pipelined, and wait for every
        confirm. Returns a BatchResult (message ids are the properties' message_id, or ""). Any application
        thread; blocks (interruptibly) until every message is settled."""
        return self._batch(self._from_message(m) for m in messages)

    def _batch(self, messages: Iterable[Outgoing]) -> BatchResult:
        """Feed the client in chunks while at most 2 x window messages are outstanding, then wait for the rest.
        The sending thread; encoding happens here, lazily."""
        batch = Batch()
        ids: list[str] = []
        chunk: list[Outgoing] = []
        limit = 2 * self.window
        step = max(1, min(BATCH_STEP, self.window // 4))
        self._running()  # started before the first message is made: a connection is on its way meanwhile
        try:
            for msg in messages:
                msg.done, msg.index = batch, len(ids)
                ids.append(msg.message_id or "")
                chunk.append(msg)
                if len(chunk) >= step:
                    self._hand_over(chunk)
                    chunk = []
                    while len(ids) - batch.settled >= limit:
                        self._wait_batch(batch, len(ids) - limit + step)
        except Exception as exc:  # making a message failed (arguments that are not JSON, say)
            # The messages before it go, and the caller learns exactly what became of them.
            if chunk:
                self._hand_over(chunk)
            while batch.settled < len(ids):
                self._wait_batch(batch, len(ids))
            exc.partial = BatchResult(ids, sorted(batch.failed, key=lambda f: f.index))  # type: ignore[attr-defined]
            exc.add_note(f"magne: the {len(ids)} messages before it were published or failed as exc.partial (a "
                         "BatchResult) says; none after it was made")
            raise
        if chunk:
            self._hand_over(chunk)
        while batch.settled < len(ids):
            self._wait_batch(batch, len(ids))
        return BatchResult(ids, sorted(batch.failed, key=lambda f: f.index))

    def _hand_over(self, chunk: list[Outgoing]) -> Client:
        client = self._running()
        client.publish_many(chunk)
        return client

    def _wait_batch(self, batch: Batch, need: int) -> None:
        """Wait until `need` messages of the batch are settled, giving up if none is for too long."""
        batch.need = need
        last, since = batch.settled, time.monotonic()
        while batch.settled < need:
            if batch.signal.wait(SLICE):
                continue
            if batch.settled != last:
                last, since = batch.settled, time.monotonic()
            elif time.monotonic() - since > self.confirm_timeout + GRACE:
                raise raised(BrokerTimeout(f"no outcome for a batch message within {self.confirm_timeout + GRACE:g}s "
                                           "(the publisher's loop is stuck)"))

    # -- sending: asyncio -------------------------------------------------------------------------------------------
    def send_async(self, task: TaskLike, args: Any = (), kwargs: dict[str, Any] | None = None,
                   delay: float | None = None, message_id: str | None = None, declare: bool = True,
                   priority: int | None = None) -> Awaitable[str]:
        """`await publisher.send_async(task, args)`: the message id once the broker confirmed it.

        Never blocks the event loop: encoding is all that happens on the loop's thread. The message is handed over
        at the call (a caller that does not await still sends) while fewer than two windows of messages are
        outstanding; past that, the call joins this event loop's backlog (its arguments and a future, not an encoded
        message: a stalled broker does not pile up every call's frames in memory), and the backlog is encoded and
        handed over as the broker confirms what is in flight. Cancelling the await before a message was handed over
        keeps it from being sent; after, it does not unsend it. Arguments that can never be sent raise at the call
        (under backpressure: from the await). Call on the event loop's thread."""
        loop = asyncio.get_running_loop()
        client = self._running()
        mid = message_id or wire.new_id()
        backlog = self._backlogs.get(loop)
        if not backlog and client.has_room(2 * self.window):
            return loop.create_task(self._hand(loop, client, task, args, kwargs, delay, mid, declare, priority))
        future: asyncio.Future[str] = loop.create_future()
        if backlog is None:
            backlog = self._backlogs[loop] = deque()
        backlog.append((future, task, args, kwargs, delay, mid, declare, priority))
        if len(backlog) == 1:
            client.when_room(2 * self.window, lambda: loop.call_soon_threadsafe(self._drain_backlog, loop))
        return future

    def _hand(self, loop: asyncio.AbstractEventLoop, client: Client, task: TaskLike, args: Any,
              kwargs: dict[str, Any] | None, delay: float | None, mid: str, declare: bool,
              priority: int | None) -> Any:
        """Encode and hand over one message; the coroutine that awaits its outcome. The event loop's thread."""
        msg = self._task_message(task, args, kwargs, delay, mid, declare, priority)
        future: asyncio.Future[str] = loop.create_future()
        msg.done = Async(loop, future)
        client.publish(msg)
        return self._outcome(msg, future, client)

    def _drain_backlog(self, loop: asyncio.AbstractEventLoop) -> None:
        """The event loop's thread, woken by the engine once there is room: hand over what waits, while room lasts."""
        backlog = self._backlogs.get(loop)
        client = self._running()
        while backlog and client.has_room(2 * self.window):
            future, task, args, kwargs, delay, mid, declare, priority = backlog.popleft()
            if future.done():  # cancelled by its caller before it was handed over: not sent
                continue
            try:
                outcome = self._hand(loop, client, task, args, kwargs, delay, mid, declare, priority)
            except Exception as exc:  # arguments that can never be sent: that caller's error, the others go on
                future.set_exception(exc)
                continue
            loop.create_task(outcome).add_done_callback(lambda t, f=future: _chain(t, f))
        if backlog:
            client.when_room(2 * self.window, lambda: loop.call_soon_threadsafe(self._drain_backlog, loop))
        else:
            self._backlogs.pop(loop, None)

    async def _outcome(self, msg: Outgoing, future: asyncio.Future[str], client: Client) -> str:
        """Await a handed-over message's outcome. If the client ended before it took the message (another thread's
        close() won the race), the next client takes it over, as a blocking send's wait does."""
        while True:
            try:
                return await asyncio.wait_for(asyncio.shield(future), SLICE * 5)
            except TimeoutError:
                if not client.alive and not msg.settled:
                    client = self._running()
                    client.publish(msg)
                if time.monotonic() > msg.deadline + GRACE and not future.done():
                    raise raised(BrokerTimeout(f"no outcome for the message to {msg.routing_key!r} within "
                                               f"{self.confirm_timeout + GRACE:g}s (the publisher's loop is stuck)")) from None


def _chain(task: asyncio.Task[str], future: asyncio.Future[str]) -> None:
    """A backlogged send's outcome to the future its caller holds (the event loop's thread)."""
    if future.done():
        return
    if task.cancelled():
        future.cancel()
    elif task.exception() is not None:
        future.set_exception(task.exception())  # type: ignore[arg-type]
    else:
        future.set_result(task.result())


def _after_fork_in_child() -> None:
    """os.register_at_fork hook, in the child right after fork (one thread exists: the forking one)."""
    global _default_lock
    _default_lock = threading.Lock()  # another thread of the parent may have held it at the fork
    for pub in list(_publishers):
        pub._forget_parent()


os.register_at_fork(after_in_child=_after_fork_in_child)


# -- the default publisher (task.send) ---------------------------------------------------------------------------------
_default: Any = None
_default_lock = threading.Lock()


def default_publisher() -> Any:
    """The process-wide publisher, for the URL in MAGNE_URL (or the default); magne.testing's stand-in while one
    is installed (set_default)."""
    global _default
    with _default_lock:
        if _default is None:
            _default = Publisher()
        return _default


def set_default(publisher: Any) -> Any:
    """Install `publisher` as the default (what task.send uses); returns the one it replaces. The seam
    magne.testing installs its in-memory worker through. Any thread."""
    global _default
    with _default_lock:
        old, _default = _default, publisher
    return old


def configure(url: str | list[str] | None = None, queue_type: str = "classic") -> Publisher:
    """Point `task.send` at another broker URL. The old publisher settles what it has in flight after the new one
    is in place, outside the lock: other threads' sends go to the new one meanwhile instead of waiting."""
    new = Publisher(url, queue_type)
    old = set_default(new)
    if old is not None:
        old.close()
    return new

