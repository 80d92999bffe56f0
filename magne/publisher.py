"""Confirmed publishing for applications (`task.send`) and the CLI.

Blocking and thread-safe: one connection per process, opened on first use, with
publisher confirms; `publish` returns only after the broker confirmed that very
message (or raises). Heartbeats are off on this connection (no thread of its own
sends them); a connection found dead on the next publish is reopened and the
publish made once more.

Interruptions: a thread interrupted while it waits (a time limit or a cold stop
raised into a task that was sending) leaves the connection in an unknown state
(a confirm may still come for its message), so any exception drops the connection
and the next publish opens a fresh one; it can never take an older message's
confirm for its own. Waiting for the lock and for the confirm both happen in
slices of at most 0.2 s, so a sending thread stays interruptible even while the
broker blocks publishing during an alarm.
"""

from __future__ import annotations

import os
import threading

from pamqp import commands

from magne import topology
from magne.amqp.client import Client
from magne.amqp.errors import BrokerTimeout, ChannelClosed, ConnectionLost
from magne.amqp.url import parse_url, resolve_url
from magne.errors import ConfigError

LOCK_SLICE = 0.2


class NoSuchQueue(ConfigError):
    """`magne send` to a queue that does not exist (it never creates one by guessing)."""


class Publisher:
    def __init__(self, url: str | None = None, queue_type: str = "classic", confirm_timeout: float = 30.0) -> None:
        self.params = parse_url(resolve_url(url))
        self.queue_type = queue_type
        self.confirm_timeout = confirm_timeout
        self._lock = threading.Lock()
        self._client: Client | None = None
        self._pid = 0
        self._declared: set[str] = set()

    def _connection(self) -> Client:
        if self._client is None or self._pid != os.getpid():
            # After fork the parent's socket is not ours to use: never touch it, open our own.
            client = Client(self.params, "magne publisher", confirms=True, timeout=self.confirm_timeout)
            client.open()
            self._client, self._pid = client, os.getpid()
            self._declared.clear()
        return self._client

    def publish(
        self,
        queue: str,
        body: bytes,
        properties: commands.Basic.Properties,
        exchange: str | None = None,
        delay: float | None = None,
        queue_type: str | None = None,
        declare: bool = True,
    ) -> None:
        """Publish to `queue` (through its exchange, or after `delay` seconds on the broker) and wait for the confirm.

        `declare=False` publishes only to a queue that exists (checked once, passively) and
        raises NoSuchQueue otherwise: what `magne send` does, so that a typo never creates
        broker objects. Called from any application thread; serialised by the publisher's lock.
        """
        while not self._lock.acquire(timeout=LOCK_SLICE):
            pass  # a bounded wait per slice keeps the thread interruptible
        try:
            try:
                self._publish(queue, body, properties, exchange, delay, queue_type, declare)
            except BrokerTimeout:
                raise  # it may still be confirmed later: publishing again here would only duplicate it
            except ConnectionLost:
                self._drop()  # found dead (idle too long, broker restarted): once more on a fresh connection
                self._publish(queue, body, properties, exchange, delay, queue_type, declare)
        except BaseException:
            self._drop()
            raise
        finally:
            self._lock.release()

    def _publish(self, queue: str, body: bytes, properties: commands.Basic.Properties, exchange: str | None,
                 delay: float | None, queue_type: str | None, declare: bool = True) -> None:
        client = self._connection()
        routing_key = queue
        if exchange is None:
            if queue not in self._declared:
                if declare:
                    for method, reply in topology.declarations(queue, queue_type or self.queue_type):
                        client.rpc(method, reply)
                else:
                    self._check_exists(client, queue)
                self._declared.add(queue)
            exchange = queue
        if delay is not None and delay > 0:
            # Wait on the broker: a TTL queue that dead-letters into the task queue.
            ms = topology.delay_ms(delay)
            client.rpc(topology.declare_delay(queue, ms), commands.Queue.DeclareOk)
            exchange, routing_key = "", topology.delay_queue(queue, ms)
        client.publish_confirmed(exchange, routing_key, body, properties)

    def _check_exists(self, client: Client, queue: str) -> None:
        try:
            client.rpc(commands.Queue.Declare(queue=queue, passive=True), commands.Queue.DeclareOk)
            client.rpc(commands.Exchange.Declare(exchange=queue, passive=True), commands.Exchange.DeclareOk)
        except ChannelClosed as exc:
            if exc.code != 404:
                raise
            raise NoSuchQueue(f"queue {queue!r} (or its exchange) does not exist: start a worker for its tasks, "
                              "or pass --declare (with --queue-type if it must be a quorum queue)") from None

    def _drop(self) -> None:
        if self._client is not None and self._pid == os.getpid():
            self._client.conn.abort()
        self._client = None

    def close(self) -> None:
        while not self._lock.acquire(timeout=LOCK_SLICE):
            pass
        try:
            if self._client is not None and self._pid == os.getpid():
                self._client.close()
            self._client = None
        finally:
            self._lock.release()


_default: Publisher | None = None
_default_lock = threading.Lock()


def default_publisher() -> Publisher:
    """The process-wide publisher, for the URL in MAGNE_URL (or the default)."""
    global _default
    with _default_lock:
        if _default is None:
            _default = Publisher()
        return _default


def configure(url: str | None = None, queue_type: str = "classic") -> Publisher:
    """Point `task.send` at another broker URL."""
    global _default
    with _default_lock:
        if _default is not None:
            _default.close()
        _default = Publisher(url, queue_type)
        return _default
