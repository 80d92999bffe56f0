"""Confirmed publishing for applications (`task.send`) and the CLI.

Blocking and thread-safe: one connection per process, opened on first use, with
publisher confirms; `publish` returns only after the broker confirmed the message.
Heartbeats are off on this connection (it has no I/O thread to send them); a
connection found dead on the next publish is reopened and the publish retried once.
"""

from __future__ import annotations

import os
import threading

from pamqp import commands

from magne import topology
from magne.amqp.connection import AMQPError, Connection, ConnectionLost
from magne.amqp.url import parse_url, resolve_url

CHANNEL = 1


class PublishError(AMQPError):
    pass


class Publisher:
    def __init__(self, url: str | None = None, queue_type: str = "classic") -> None:
        self.params = parse_url(resolve_url(url))
        self.queue_type = queue_type
        self._lock = threading.Lock()
        self._conn: Connection | None = None
        self._pid = 0
        self._declared: set[str] = set()

    def _connection(self) -> Connection:
        if self._conn is None or self._pid != os.getpid():
            # After fork the parent's socket is not ours to use.
            conn = Connection(self.params, "magne publisher", heartbeat=0)
            conn.connect()
            conn.open_channel(CHANNEL)
            conn.rpc(CHANNEL, commands.Confirm.Select(), commands.Confirm.SelectOk)
            self._conn, self._pid = conn, os.getpid()
            self._declared.clear()
        return self._conn

    def publish(
        self,
        queue: str,
        body: bytes,
        properties: commands.Basic.Properties,
        exchange: str | None = None,
        delay: float | None = None,
        queue_type: str | None = None,
    ) -> None:
        """Publish to `queue` (through its exchange, or after `delay` seconds on the broker) and wait for the confirm."""
        with self._lock:
            try:
                self._publish(queue, body, properties, exchange, delay, queue_type)
            except ConnectionLost:
                self._drop()
                self._publish(queue, body, properties, exchange, delay, queue_type)
            except AMQPError:
                self._drop()
                raise

    def _publish(self, queue: str, body: bytes, properties: commands.Basic.Properties, exchange: str | None,
                 delay: float | None, queue_type: str | None) -> None:
        conn = self._connection()
        routing_key = queue
        if exchange is None:
            if queue not in self._declared:
                topology.declare(conn, CHANNEL, queue, queue_type or self.queue_type)
                self._declared.add(queue)
            exchange = queue
        if delay is not None and delay > 0:
            # Wait on the broker: a TTL queue that dead-letters into the task queue.
            ms = topology.delay_ms(delay)
            conn.rpc(CHANNEL, topology.declare_delay(queue, ms), commands.Queue.DeclareOk)
            exchange, routing_key = "", topology.delay_queue(queue, ms)
        conn.publish(CHANNEL, exchange, routing_key, body, properties, mandatory=True)
        reply = conn.wait(CHANNEL, commands.Basic.Ack, commands.Basic.Nack)
        if isinstance(reply, commands.Basic.Nack):
            raise PublishError(f"broker refused the message for queue {queue!r} (basic.nack)")
        if conn.contents:
            _, ret, _, _ = conn.contents.popleft()
            raise PublishError(f"message for queue {queue!r} was unroutable: {ret.reply_code} {ret.reply_text}")

    def _drop(self) -> None:
        if self._conn is not None:
            self._conn.close_socket()
        self._conn = None

    def close(self) -> None:
        with self._lock:
            if self._conn is not None and self._pid == os.getpid():
                self._conn.close()
            self._conn = None


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
