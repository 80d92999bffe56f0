"""The I/O thread: the only code that touches the worker's AMQP socket.

It connects, declares, consumes, decodes deliveries onto the work queue, and writes
acks, rejects and heartbeats; it also drives the publishing link (publish_link.py)
that carries retry and dead-letter copies, so the consuming connection never
publishes and a broker alarm cannot stall its acks. Worker threads hand outcomes
back with `report()`: append to a deque and, if no wake-up is pending, write the
eventfd once. The I/O thread clears the flag before draining, so a batch of
outcomes costs one wake-up (about 4 us/msg here, against 18 us/msg for one
wake-up per ack, issue 2's figures). It never runs user code and never blocks
on anything but its selector.
"""

from __future__ import annotations

import logging
import os
import random
import selectors
import threading
import time
from collections import deque
from queue import Empty, SimpleQueue
from typing import Any

from pamqp import commands

from magne import topology
from magne.acks import AckCoalescer
from magne.amqp import frames
from magne.amqp.connection import AMQPError, ChannelClosed, Connection, ConnectionClosed, ConnectionLost
from magne.amqp.url import Params
from magne.delivery import ACK, RETRY, Delivery
from magne.publish_link import PublishLink

log = logging.getLogger("magne.io")

CHANNEL = 1  # the one consuming channel
READ, WRITE = selectors.EVENT_READ, selectors.EVENT_WRITE


class ConsumerCancelled(AMQPError):
    """The broker cancelled our consumer (queue deleted, failover, ...)."""


class Stats:
    """Counters written only by the I/O thread; read by the main thread for log lines."""

    def __init__(self) -> None:
        self.delivered = 0
        self.acked = 0
        self.dead = 0
        self.retried = 0
        self.requeued = 0
        self.redelivered = 0
        self.stale = 0  # outcomes of deliveries from a channel that is gone
        self.reconnects = 0

    def line(self) -> str:
        return (f"delivered={self.delivered} acked={self.acked} retried={self.retried} dead-lettered={self.dead} "
                f"requeued={self.requeued} redelivered={self.redelivered} "
                f"stale={self.stale} reconnects={self.reconnects}")


class Backoff:
    """Exponential backoff with full jitter, capped."""

    def __init__(self, base: float = 0.5, cap: float = 30.0) -> None:
        self.base, self.cap, self.attempt = base, cap, 0

    def next(self) -> float:
        self.attempt += 1
        return random.uniform(self.base, min(self.cap, self.base * 2 ** self.attempt))

    def reset(self) -> None:
        self.attempt = 0


class IOThread(threading.Thread):
    def __init__(
        self,
        params: Params,
        queues: list[str],
        prefetch: int,
        work: SimpleQueue[Delivery | None],
        queue_types: dict[str, str] | None = None,
    ) -> None:
        super().__init__(name="magne-io", daemon=True)
        self.params = params
        self.queues = queues
        self.prefetch = prefetch
        self.work = work
        self.queue_types = queue_types or {}
        self.stats = Stats()
        self.ready = threading.Event()
        self.finished = threading.Event()
        self.failed: str | None = None  # why the first connection could not be made
        self.outcomes: deque[Delivery] = deque()
        self._wake_pending = False
        self._wake_fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self._stop = 0  # 0 running, 1 warm stop, 2 close now
        self.gen = 0
        self.conn: Connection | None = None
        self.inflight = 0  # deliveries of this generation handed to the pool and not back yet
        self.link = PublishLink(params, f"magne worker publisher [{', '.join(queues)}]", self._copy_confirmed)
        self._unsent: list[Delivery] = []  # copies waiting for the link to come back
        self._link_backoff = Backoff(1.0, 30.0)
        self._link_retry_at = 0.0
        self._reset_channel_state()

    # -- called from other threads ---------------------------------------------
    def report(self, d: Delivery) -> None:
        """A worker thread's hand-off of a finished delivery (lock-free: deque + flag)."""
        self.outcomes.append(d)
        if not self._wake_pending:
            self._wake_pending = True
            os.eventfd_write(self._wake_fd, 1)

    def request_stop(self, force: bool = False) -> None:
        self._stop = 2 if force else max(self._stop, 1)
        os.eventfd_write(self._wake_fd, 1)

    # -- thread body ---------------------------------------------------------------
    def run(self) -> None:
        try:
            self._run()
        except BaseException as exc:  # the I/O thread must never vanish silently
            log.exception("I/O thread crashed: %s; the worker will exit and unacked messages return to the queue", exc)
            if self.failed is None:
                self.failed = f"I/O thread crashed: {exc}"
        finally:
            if self.conn is not None:
                self.conn.close_socket()
            if self.link.is_open:
                self.link.close()
            self.finished.set()

    def _run(self) -> None:
        backoff = Backoff()
        while not self._stop:
            try:
                self._connect()
            except AMQPError as exc:
                if not self.ready.is_set():
                    self.failed = str(exc)
                    return
                delay = backoff.next()
                log.warning("reconnect attempt %d to %s failed: %s; next attempt in %.1fs",
                            backoff.attempt, self.params.safe_url(), exc, delay)
                self._sleep(delay)
                continue
            if self.ready.is_set():
                self.stats.reconnects += 1
                log.info("reconnected to %s; consuming %s again", self.params.safe_url(), ", ".join(self.queues))
            self.ready.set()
            started = time.monotonic()
            try:
                self._loop()
                return
            except AMQPError as exc:
                self._lose_connection(exc)
                if time.monotonic() - started > 10:
                    backoff.reset()
                # A short pause even on the first retry, so a broker that closes us at
                # once (a 406 on consume, say) is not hammered.
                self._sleep(backoff.next() if backoff.attempt else 0.2)

    def _sleep(self, seconds: float) -> None:
        """Sleep, but wake at once for a stop request."""
        sel = selectors.DefaultSelector()
        try:
            sel.register(self._wake_fd, READ)
            deadline = time.monotonic() + seconds
            while not self._stop:
                left = deadline - time.monotonic()
                if left <= 0:
                    return
                if sel.select(left):
                    self._clear_wake()
        finally:
            sel.close()

    def _clear_wake(self) -> None:
        try:
            os.eventfd_read(self._wake_fd)
        except BlockingIOError:
            pass

    # -- connection setup ----------------------------------------------------------
    def _reset_channel_state(self) -> None:
        self.acks = AckCoalescer()
        self._ctags: dict[bytes, str] = {}
        self._out: list[bytes] = []
        self._partial = b""
        self._cancelled = False
        self._closing = 0  # 0 open, 1 channel closing, 2 connection closing, 3 closed
        self._close_oks = 0
        self.inflight = 0

    def _connect(self) -> None:
        conn = Connection(self.params, f"magne worker [{', '.join(self.queues)}]")
        conn.connect()
        try:
            conn.open_channel(CHANNEL)
            for q in self.queues:
                topology.declare(conn, CHANNEL, q, self.queue_types.get(q, "classic"))
            conn.rpc(CHANNEL, commands.Basic.Qos(prefetch_count=self.prefetch), commands.Basic.QosOk)
            self.gen += 1
            self._reset_channel_state()
            self.conn = conn
            # Deliveries may arrive between the consume-oks: route them from now on.
            conn.decoder.on_content = self._on_content
            for q in self.queues:
                ctag = f"magne.{q}.{os.getpid()}.{self.gen}"
                self._ctags[ctag.encode()] = q
                conn.rpc(CHANNEL, commands.Basic.Consume(queue=q, consumer_tag=ctag), commands.Basic.ConsumeOk)
            conn.decoder.on_frame = self._on_frame
        except BaseException:
            conn.close_socket()
            self.conn = None
            raise

    def _lose_connection(self, exc: BaseException) -> None:
        if self.conn is not None:
            self.conn.close_socket()
        self.conn = None
        # Deliveries that never started belong to the dead channel: the broker
        # redelivers them, so running them now would only make duplicates.
        dropped = self._take_unstarted()
        running = self.inflight - len(dropped)
        self.gen += 1  # outcomes still to come from the old channel are now stale
        self._reset_channel_state()
        log.warning("connection lost: %s; reconnecting. %d prefetched messages dropped unstarted, %d tasks keep "
                    "running (their outcomes cannot be acked on a new channel, so those messages will be redelivered)",
                    exc, len(dropped), running)

    def _take_unstarted(self) -> list[Delivery]:
        taken: list[Delivery] = []
        while True:
            try:
                d = self.work.get_nowait()
            except Empty:
                return taken
            if d is None:  # the pool's stop sentinel: not ours
                self.work.put(None)
                return taken
            if d.gen == self.gen:
                taken.append(d)

    # -- frames from the broker ----------------------------------------------------
    def _on_content(self, channel: int, method: Any, header: bytes, body: bytes) -> None:
        if type(method) is not tuple:  # nothing else carries content on a consuming channel
            log.warning("ignoring unexpected %s on the consuming channel", method.name)
            return
        ctag, tag, redelivered, _exchange, _rk = method
        self.stats.delivered += 1
        if redelivered:
            self.stats.redelivered += 1
        if self._cancelled:  # arrived after our basic.cancel: give it straight back
            self._out.append(frames.encode_reject(CHANNEL, tag, True))
            self.acks.mark_sent(tag)
            self.stats.requeued += 1
            return
        self.inflight += 1
        self.work.put(Delivery(tag, self.gen, self._ctags[ctag], body, header, redelivered))

    def _on_frame(self, channel: int, frame: Any) -> None:
        if isinstance(frame, commands.Channel.Close):
            self._out.append(frames.encode(channel, commands.Channel.CloseOk()))
            self._flush_quiet()
            raise ChannelClosed(channel, frame.reply_code, frame.reply_text)
        elif isinstance(frame, commands.Connection.Close):
            self._out.append(frames.encode(0, commands.Connection.CloseOk()))
            self._flush_quiet()
            raise ConnectionClosed(frame.reply_code, frame.reply_text)
        elif isinstance(frame, commands.Basic.Cancel):
            raise ConsumerCancelled(f"broker cancelled consumer {frame.consumer_tag} (queue deleted or moved?)")
        elif isinstance(frame, commands.Channel.CloseOk):
            self._close_oks += 1
        elif isinstance(frame, commands.Connection.CloseOk):
            self._closing = 3
        elif not isinstance(frame, commands.Basic.CancelOk | commands.Connection.Blocked | commands.Connection.Unblocked):
            log.debug("ignoring %s on channel %d", frame.name, channel)

    # -- outcomes from the pool ----------------------------------------------------
    def _drain(self) -> None:
        outcomes = self.outcomes
        gen = self.gen
        out = self._out
        finished: list[int] = []
        n = 0
        while outcomes:
            d = outcomes.popleft()
            if d.gen != gen:
                self.stats.stale += 1
                continue
            n += 1
            o = d.outcome
            if o == ACK:
                finished.append(d.tag)
            elif d.copy_to:  # DEAD or RETRY
                self._copy_then_ack(d)
            else:
                out.append(frames.encode_reject(CHANNEL, d.tag, True))
                self.acks.mark_sent(d.tag)
                self.stats.requeued += 1
        if n:
            self.inflight -= n
        if finished:
            self.stats.acked += len(finished)
            for tag, multiple in self.acks.settle(finished):
                out.append(frames.encode_ack(CHANNEL, tag, multiple))

    def _copy_then_ack(self, d: Delivery) -> None:
        """DEAD / RETRY: publish the copy the pool prepared; the ack waits for the broker's confirm."""
        err = d.error or {}
        what = f"{d.reason} ({err.get('type')}: {err.get('message')})" if err else d.reason
        if d.outcome == RETRY:
            log.warning("message %s (task %s) from queue %s failed: %s; retry %s in %.1fs",
                        d.message_id(), d.task or "?", d.queue, what,
                        d.copy_props.headers.get("x-magne-retries"), d.delay)
        else:
            log.warning("message %s (task %s) from queue %s failed: %s; dead-lettering it to %s",
                        d.message_id(), d.task or "?", d.queue, what, d.copy_to)
        if self._unsent:  # the link is down: keep the order, wait for it
            self._unsent.append(d)
            return
        try:
            self.link.publish(d)
        except AMQPError as exc:
            self._link_failed(exc, [d])

    def _copy_confirmed(self, d: Delivery, ok: bool) -> None:
        """From the link: the broker has (or refused) the copy; now the original can be settled."""
        if d.gen != self.gen or self._closing:
            self.stats.stale += 1  # its channel is gone: the original comes back redelivered
            return
        if ok:
            if d.outcome == RETRY:
                self.stats.retried += 1
            else:
                self.stats.dead += 1
            for tag, multiple in self.acks.settle([d.tag]):
                self._out.append(frames.encode_ack(CHANNEL, tag, multiple))
        else:
            log.error("broker refused the copy of message %s (basic.nack); requeueing the original", d.message_id())
            self._out.append(frames.encode_reject(CHANNEL, d.tag, True))
            self.acks.mark_sent(d.tag)
            self.stats.requeued += 1

    def _link_failed(self, exc: BaseException, extra: list[Delivery]) -> None:
        pending = [d for d in self.link.fail() + extra if d.gen == self.gen]
        self._unsent = pending + self._unsent
        delay = self._link_backoff.next()
        self._link_retry_at = time.monotonic() + delay
        log.warning("publishing connection failed: %s; %d copies will be published again in %.1fs "
                    "(their originals stay unacked until then)", exc, len(self._unsent), delay)

    def _service_link(self, now: float) -> None:
        try:
            if self._unsent and now >= self._link_retry_at:
                unsent, self._unsent = self._unsent, []
                for i, d in enumerate(unsent):
                    try:
                        self.link.publish(d)
                    except AMQPError:
                        self._unsent = unsent[i:]
                        raise
                self._link_backoff.reset()
            self.link.check(now)
            self.link.flush()
        except AMQPError as exc:
            self._link_failed(exc, [])

    # -- the loop ------------------------------------------------------------------
    def _loop(self) -> None:
        conn = self.conn
        assert conn is not None and conn.sock is not None
        sock = conn.sock
        sock.setblocking(False)
        sel = selectors.DefaultSelector()
        sel.register(sock, READ, None)
        sel.register(self._wake_fd, READ, self)
        self.link.attach(sel)
        self._writing = False
        hb = conn.heartbeat
        now = time.monotonic()
        self.last_read = self.last_write = now
        close_deadline = 0.0
        try:
            while True:
                timeout: float | None = None
                if hb:
                    timeout = max(0.0, min(self.last_write + hb / 2, self.last_read + 2 * hb) - now)
                if close_deadline:
                    timeout = max(0.0, min(timeout if timeout is not None else 1.0, close_deadline - now))
                if self.link.is_open or self._unsent:  # its timers: retry, overdue confirms, idle close
                    timeout = max(0.0, min(timeout if timeout is not None else 1.0, 1.0))
                events = sel.select(timeout)
                now = time.monotonic()
                for key, mask in events:
                    if key.data is self:
                        self._clear_wake()
                        continue
                    if key.data is self.link:
                        try:
                            self.link.on_event(mask)
                        except AMQPError as exc:
                            self._link_failed(exc, [])
                        continue
                    if mask & READ and conn.recv_some():
                        self.last_read = now
                    if mask & WRITE:
                        self._flush(sock, sel, now)
                self._wake_pending = False  # before draining: see report()
                if self.outcomes:
                    self._drain()
                if self.link.is_open or self._unsent:
                    self._service_link(now)
                if self._stop:
                    close_deadline = self._shutdown_step(now, close_deadline)
                    if self._closing == 3:
                        return
                if hb:
                    if now - self.last_read > 2 * hb:
                        raise ConnectionLost(f"missed heartbeats: nothing from the broker for {now - self.last_read:.0f}s")
                    if now - self.last_write >= hb / 2 and not self._out:
                        self._out.append(frames.HEARTBEAT)
                if self._out or self._partial:
                    self._flush(sock, sel, now)
        finally:
            sel.close()

    def _flush(self, sock: Any, sel: selectors.BaseSelector, now: float) -> None:
        assert self.conn is not None
        data = self._partial + b"".join(self._out) if self._out else self._partial
        self._out.clear()
        sent = self.conn.send_some(data)
        if sent:
            self.last_write = now
        self._partial = data[sent:]
        if bool(self._partial) != self._writing:
            self._writing = bool(self._partial)
            sel.modify(sock, READ | WRITE if self._writing else READ, None)

    def _flush_quiet(self) -> None:
        """Best-effort blocking write of what is queued (close-ok before we drop the socket)."""
        if self.conn is None or self.conn.sock is None:
            return
        try:
            self.conn.sock.setblocking(True)
            self.conn.sock.settimeout(1.0)
            self.conn.sock.sendall(self._partial + b"".join(self._out))
        except OSError:
            pass
        self._out.clear()
        self._partial = b""

    def _shutdown_step(self, now: float, close_deadline: float) -> float:
        """Warm: cancel, give back the unstarted, wait for the running; then close the channel, then the connection."""
        out = self._out
        if not self._cancelled:
            self._cancelled = True
            for ctag in self._ctags:
                out.append(frames.encode(CHANNEL, commands.Basic.Cancel(consumer_tag=ctag.decode())))
            back = self._take_unstarted()
            for d in back:
                out.append(frames.encode_reject(CHANNEL, d.tag, True))
                self.acks.mark_sent(d.tag)
            self.inflight -= len(back)
            self.stats.requeued += len(back)
            log.info("stopping: consumers cancelled, %d prefetched messages given back, waiting for %d running tasks",
                     len(back), self.inflight)
        copies_pending = bool(self.link.confirms or self._unsent)
        if self._closing == 0 and (self._stop == 2 or (self.inflight <= 0 and not copies_pending)):
            if self.inflight > 0:
                log.warning("closing with %d tasks unfinished; the broker requeues their messages", self.inflight)
            self.gen += 1  # nothing more may be written on these channels
            out.append(frames.encode(CHANNEL, commands.Channel.Close(200, "worker stopping", 0, 0)))
            self._closing = 1
            return now + 5.0
        if self._closing == 1 and self._close_oks >= 1:
            out.append(frames.encode(0, commands.Connection.Close(200, "worker stopping", 0, 0)))
            self._closing = 2
        if close_deadline and now >= close_deadline and self._closing < 3:
            log.warning("broker did not answer the close within 5s; dropping the connection")
            self._closing = 3
        return close_deadline

