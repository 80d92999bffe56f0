"""The I/O thread's publishing connection, for retry and dead-letter copies.

Why a second connection: RabbitMQ (3.x) blocks a connection that publishes during a
memory or disk alarm, and a blocked connection's socket is not read at all, so
acks on it would stall too (connection.blocked is only sent once the connection
has published). Copies therefore go out on their own connection, and the
consuming connection never publishes: a blocked retry waits, acks keep flowing.
The link is opened on first use and closed after a minute idle, so a worker whose
tasks do not fail holds exactly one connection. It is owned and driven by the I/O
thread like the consuming socket; its heartbeats are off (it may sit blocked for
as long as an alarm lasts) and a dead link is found by its socket or by a
confirm overdue for longer than `confirm_timeout` while not blocked.

Opening the link is a blocking handshake in the I/O thread, so it gets
OPEN_TIMEOUT seconds at most (a local broker answers in milliseconds); a link that
cannot open is retried later rather than stall the loop that keeps the consuming
connection's heartbeats and acks going.
"""

from __future__ import annotations

import dataclasses
import logging
import selectors
import time
from collections.abc import Callable
from typing import Any

from pamqp import commands

from magne.amqp import frames
from magne.amqp.connection import AMQPError, ChannelClosed, Connection, ConnectionClosed, ConnectionLost
from magne.amqp.url import Params
from magne.delivery import Delivery

log = logging.getLogger("magne.io")

CH = 1
IDLE_CLOSE = 60.0
OPEN_TIMEOUT = 2.0


class PublishLink:
    def __init__(self, params: Params, name: str, on_confirm: Callable[[Delivery, bool], None],
                 confirm_timeout: float = 120.0) -> None:
        self.params = params
        self.name = name
        self.on_confirm = on_confirm
        self.confirm_timeout = confirm_timeout
        self.conn: Connection | None = None
        self.sel: selectors.BaseSelector | None = None
        self.confirms: dict[int, tuple[Delivery, float]] = {}
        self.seq = 0
        self.out: list[bytes] = []
        self.partial = b""
        self.writing = False
        self.blocked = False
        self.last_used = 0.0
        self.opened = 0

    @property
    def is_open(self) -> bool:
        return self.conn is not None

    def attach(self, sel: selectors.BaseSelector) -> None:
        self.sel = sel
        if self.conn is not None and self.conn.sock is not None:
            sel.register(self.conn.sock, selectors.EVENT_READ, self)
            self.writing = False

    def open(self) -> None:
        params = dataclasses.replace(self.params, connect_timeout=min(self.params.connect_timeout, OPEN_TIMEOUT))
        conn = Connection(params, self.name, heartbeat=0, rpc_timeout=OPEN_TIMEOUT)
        conn.connect()
        try:
            conn.open_channel(CH)
            conn.rpc(CH, commands.Confirm.Select(), commands.Confirm.SelectOk)
        except BaseException:
            conn.close_socket()
            raise
        assert conn.sock is not None
        conn.sock.setblocking(False)
        conn.decoder.on_frame = self._on_frame
        conn.decoder.on_content = self._on_return
        self.conn, self.seq, self.blocked, self.opened = conn, 0, False, self.opened + 1
        self.last_used = time.monotonic()
        if self.sel is not None:
            self.attach(self.sel)
        log.info("opened the publishing connection for retry and dead-letter copies")

    def publish(self, d: Delivery) -> None:
        """Queue the copy of `d` (and its delay-queue declare) for writing; opens the link if needed."""
        if self.conn is None:
            self.open()
        assert self.conn is not None
        if d.copy_declare is not None:
            self.out.append(frames.encode(CH, d.copy_declare))
        try:
            data = frames.encode_publish(CH, "", d.copy_to, d.body, d.copy_props, self.conn.frame_max)
        except Exception as exc:  # a header value pamqp cannot write back: keep only ours
            log.warning("message %s: its headers cannot be re-encoded (%s); the copy keeps only magne's headers",
                        d.message_id(), exc)
            ours = {k: v for k, v in (d.copy_props.headers or {}).items() if k.startswith("x-magne-")}
            data = frames.encode_publish(CH, "", d.copy_to, d.body,
                                         commands.Basic.Properties(delivery_mode=2, headers=ours), self.conn.frame_max)
        self.seq += 1
        now = time.monotonic()
        self.confirms[self.seq] = (d, now)
        self.last_used = now
        self.out.append(data)

    def on_event(self, mask: int) -> None:
        assert self.conn is not None
        if mask & selectors.EVENT_READ:
            self.conn.recv_some()
        if mask & selectors.EVENT_WRITE:
            self.flush()

    def flush(self) -> None:
        if self.conn is None or self.conn.sock is None or not (self.out or self.partial):
            return
        data = self.partial + b"".join(self.out)
        self.out.clear()
        self.partial = data[self.conn.send_some(data):]
        if bool(self.partial) != self.writing and self.sel is not None:
            self.writing = bool(self.partial)
            self.sel.modify(self.conn.sock, selectors.EVENT_READ | selectors.EVENT_WRITE if self.writing
                            else selectors.EVENT_READ, self)

    def check(self, now: float) -> None:
        """Timers: a confirm overdue while not blocked means a dead link; a long idle link is closed."""
        if self.conn is None:
            return
        if self.confirms and not self.blocked:
            oldest = next(iter(self.confirms.values()))[1]
            if now - oldest > self.confirm_timeout:
                raise ConnectionLost(f"publishing connection: no confirm for {now - oldest:.0f}s")
        if not self.confirms and not self.out and now - self.last_used > IDLE_CLOSE:
            self.close()

    def _on_frame(self, _channel: int, frame: Any) -> None:
        if isinstance(frame, commands.Basic.Ack | commands.Basic.Nack):
            ok = isinstance(frame, commands.Basic.Ack)
            done = []
            if frame.multiple:
                while self.confirms:
                    first = next(iter(self.confirms))
                    if first > frame.delivery_tag:
                        break
                    done.append(self.confirms.pop(first)[0])
            elif frame.delivery_tag in self.confirms:
                done.append(self.confirms.pop(frame.delivery_tag)[0])
            for d in done:
                self.on_confirm(d, ok)
        elif isinstance(frame, commands.Connection.Blocked):
            self.blocked = True
            log.warning("broker blocked publishing (%s): retry and dead-letter copies wait, acks go on", frame.reason)
        elif isinstance(frame, commands.Connection.Unblocked):
            self.blocked = False
            log.info("broker unblocked publishing; %d copies waiting for their confirm", len(self.confirms))
        elif isinstance(frame, commands.Connection.Close):
            self.out.append(frames.encode(0, commands.Connection.CloseOk()))
            raise ConnectionClosed(frame.reply_code, frame.reply_text)
        elif isinstance(frame, commands.Channel.Close):
            raise ChannelClosed(CH, frame.reply_code, frame.reply_text)

    def _on_return(self, _channel: int, method: Any, _header: bytes, _body: bytes) -> None:
        log.error("broker returned a retry/dead-letter copy as unroutable: %s %s", method.reply_code, method.reply_text)

    def fail(self) -> list[Delivery]:
        """Drop a broken link; returns the copies that were never confirmed (to publish again)."""
        pending = [d for d, _ in self.confirms.values()]
        self.confirms.clear()
        self._drop()
        return pending

    def close(self) -> None:
        """Polite close of an idle link (blocking for at most a second: the broker is local or answers fast)."""
        conn = self.conn
        if conn is None:
            return
        self._drop(keep_socket=True)
        try:
            assert conn.sock is not None
            conn.sock.setblocking(True)
            conn.decoder.on_frame = conn._keep_frame  # blocking mode again: close-ok must reach conn.wait
            conn.close(timeout=1.0)
        except (AMQPError, OSError):
            conn.close_socket()
        log.info("closed the idle publishing connection")

    def _drop(self, keep_socket: bool = False) -> None:
        if self.conn is not None and self.conn.sock is not None and self.sel is not None:
            try:
                self.sel.unregister(self.conn.sock)
            except (KeyError, ValueError):
                pass
        if self.conn is not None and not keep_socket:
            self.conn.close_socket()
        self.conn = None
        self.out.clear()
        self.partial = b""
        self.writing = False
        self.blocked = False
