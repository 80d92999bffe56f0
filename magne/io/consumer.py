"""The consuming connection and its one channel: declare, consume, deliveries in.

Runs on the I/O thread only. After the connection opens, the channel setup (open,
qos, every declaration, every consume) is written at once and the replies are
matched in order (AMQP answers a channel's synchronous methods in order). Each
new channel is a new generation: delivery tags belong to it, and outcomes of an
older generation are never written on a newer channel (design invariant 4).

Broker frames are dispatched through a table of `_on_<frame>` handlers. A
basic.cancel from the broker (queue deleted, its node down) concerns one queue:
that queue is consumed again after a backoff, its declarations checked first on
a short-lived second channel, so a 404 there ("home node down") closes only that
channel and the other queues' running tasks keep their delivery tags.
"""

from __future__ import annotations

import enum
import itertools
import os
import time
from collections.abc import Callable
from queue import Empty, SimpleQueue
from typing import Any

from pamqp import commands

from magne import logs, topology
from magne.amqp import names
from magne.amqp.errors import ChannelClosed
from magne.amqp.url import Nodes
from magne.backoff import Backoff
from magne.delivery import Delivery
from magne.engine.connection import Connection, State
from magne.errors import BadMessage
from magne.io.settle import Settlement
from magne.io.stats import Stats, Tally
from magne.naming import consumer_tag
from magne.policy import Failure, dead_letter_plainly, decide

log = logs.Log("magne.io")

CH = 1  # the one consuming channel
PROBE_CH = 2  # a short-lived channel for checking a cancelled queue before consuming it again


class Phase(enum.Enum):
    CONNECTING = "connecting"  # socket, handshake, channel setup
    CONSUMING = "consuming"
    CANCELLING = "cancelling"  # warm stop: consumers cancelled, running tasks finishing
    CLOSING = "closing"  # channel.close sent; connection.close follows its close-ok
    CLOSED = "closed"


_TAKING = (Phase.CONNECTING, Phase.CONSUMING)  # phases in which a delivery goes to the pool


class Consumer:
    def __init__(self, nodes: Nodes, name: str, queues: list[str], prefetch: int, queue_types: dict[str, str],
                 work: SimpleQueue[Delivery | None], settlement: Settlement, stats: Stats, max_body: int,
                 copy_frame_max: int, on_ready: Callable[[], None], consumer_timeouts: dict[str, int]) -> None:
        self.nodes = nodes
        self.name = name
        self.queues = queues
        self.prefetch = prefetch
        self.queue_types = queue_types
        self.work = work
        self.settlement = settlement
        self.stats = stats
        self.max_body = max_body
        self.copy_frame_max = copy_frame_max
        self.on_ready = on_ready
        self.consumer_timeouts = consumer_timeouts  # queue -> x-consumer-timeout (ms), above its tasks' time limits
        self.max_priorities: dict[str, int] = {}  # queue -> x-max-priority, for queues whose tasks ask for one
        self.declarations: dict[str, list[topology.Declaration]] = {}  # queues declared otherwise (magne.formats)
        # Where each queue's deliveries go: the pool's work queue, unless the worker routes a queue elsewhere (the
        # event loop of async tasks, magne.asyncpool); and each such place's unstarted deliveries, taken back on
        # a warm stop or a reconnect. Set by the worker before the thread starts.
        self.sinks: dict[str, Callable[[Delivery], None]] = {q: work.put for q in queues}
        self.unstarted_elsewhere: list[Callable[[int], list[Delivery]]] = []
        self.taken_back: list[Callable[[list[Delivery]], None]] = []  # told what take_unstarted took (magne.gate)
        # Per-queue prefetch where it differs from `prefetch` (an async queue's follows its concurrency): a
        # basic.qos before that queue's basic.consume, since RabbitMQ applies it to the consumers made after it.
        self.prefetches: dict[str, int] = {}
        self._qos = 0  # the prefetch the channel's next consumer gets
        self.conn: Connection | None = None
        self.phase = Phase.CLOSED
        # --metrics: deliveries by queue. Only kept with several queues: with one, Stats' totals are its counts.
        self.tally_queues: Tally | None = stats.tally if stats.tally is not None and len(queues) > 1 else None
        self.gen = 0
        self.inflight = 0  # deliveries of this generation handed to the pool and not back yet
        self.ctags: dict[bytes, str] = {}  # consumer tag -> queue
        self.consuming: set[str] = set()
        self.reconsume: dict[str, tuple[float, Backoff]] = {}  # cancelled queue -> (when to try, its backoff)
        self._probe: tuple[str, Backoff] | None = None  # the queue being checked on PROBE_CH
        self._setup: list[str] = []  # queues not yet tried since the connection opened
        self._ctag_seq = itertools.count(1)
        self._handlers: dict[type, Callable[[Any], None]] = {
            commands.Basic.Cancel: self._on_basic_cancel,
        }

    # -- connecting ---------------------------------------------------------------------
    def connect(self, now: float) -> None:
        conn = Connection(self.nodes.current, self.name)
        conn.on_open = self._on_open
        conn.on_content = self._on_content
        conn.on_frame = self._on_frame
        conn.on_channel_close = self._on_channel_close
        self.conn, self.phase = conn, Phase.CONNECTING
        conn.start(now)

    def _on_open(self) -> None:
        """Connection open: open the channel and set QoS, then check and consume the queues one by one.

        Each queue is declared on the short-lived probe channel before it is consumed on the real
        one, so a queue that cannot be declared now (a classic queue whose node is down answers
        404 and closes the channel it was declared on) is retried later with a backoff while the
        worker consumes its other queues.
        """
        conn = self.conn
        assert conn is not None
        self.gen += 1
        self.settlement.reset(self.gen, conn.outbox)
        self.ctags.clear()
        self.consuming.clear()
        self.reconsume.clear()
        self._probe = None
        conn.call(CH, commands.Channel.Open(), (commands.Channel.OpenOk,))
        conn.call(CH, commands.Basic.Qos(prefetch_count=self.prefetch), (commands.Basic.QosOk,))
        self._qos = self.prefetch
        self._setup = list(self.queues)
        self._next_setup()

    def _next_setup(self) -> None:
        """During setup: check the next queue, or see whether setup is done."""
        if self._setup:
            self._start_probe(self._setup.pop(0), Backoff(0.5, 30.0))
        else:
            self._check_ready()

    def _consume(self, queue: str) -> None:
        """Consume `queue` and its due queue (magne.topology: where its delayed messages and retry copies come
        back), both as `queue`: a delivery of either is the same task's, settled the same way."""
        assert self.conn is not None
        # x-consumer-timeout: RabbitMQ 3.12+ applies it per consumer (3.10 accepts and ignores it),
        # so a long task is not cut by the broker's default delivery-ack timeout.
        timeout = self.consumer_timeouts.get(queue)
        args = {"x-consumer-timeout": timeout} if timeout else {}
        prefetch = self.prefetches.get(queue, self.prefetch)
        if prefetch != self._qos:
            self.conn.call(CH, commands.Basic.Qos(prefetch_count=prefetch), (commands.Basic.QosOk,))
            self._qos = prefetch
        due = topology.due_queue(queue)
        decls = self.declarations.get(queue)  # a queue declared otherwise has a due queue only if it declares one
        has_due = decls is None or any(getattr(m, "queue", None) == due for m, _r in decls)  # (dramatiq's .DQ: not)
        for physical in (queue, due) if has_due else (queue,):
            ctag = consumer_tag(physical, os.getpid(), self.gen, next(self._ctag_seq))
            self.ctags[ctag.encode()] = queue  # deliveries may arrive before the consume-ok
            self.conn.call(CH, names.BasicConsume(queue=physical, consumer_tag=ctag, arguments=args),
                           (commands.Basic.ConsumeOk,), lambda _ok, due=physical != queue: self._on_consume_ok(queue, due))

    def _on_consume_ok(self, queue: str, due: bool = False) -> None:
        self.consuming.add(queue)
        if self.phase is Phase.CONNECTING:
            self._check_ready()
        elif self.phase is Phase.CONSUMING and not due:
            self.reconsume.pop(queue, None)
            log.info("consuming queue %s again", queue, event="reconsumed", queue=queue)

    def _check_ready(self) -> None:
        """Setup is done once every queue was tried and is consumed or waiting to be tried again."""
        if self._setup or self._probe is not None:
            return
        if len(self.consuming) + len(self.reconsume) >= len(self.queues):
            self.phase = Phase.CONSUMING
            self.on_ready()

    # -- deliveries ----------------------------------------------------------------------
    def _on_content(self, _channel: int, method: Any, header: bytes, body: bytes) -> None:
        if type(method) is not tuple:  # nothing else carries content on a consuming channel
            log.warning("ignoring an unexpected %s on the consuming channel", getattr(method, "name", "frame"))
            return
        ctag, tag, redelivered, _exchange, _rk = method
        stats = self.stats
        stats.delivered += 1
        if redelivered:
            stats.redelivered += 1
        queue = self.ctags.get(ctag)
        if self.tally_queues is not None:  # --metrics with several queues (with one, the totals are its counts)
            _count_delivery(self.tally_queues, queue, redelivered)
        if queue is None or self.phase not in _TAKING:
            self.settlement.give_back([tag])  # after our basic.cancel, or for a consumer we no longer have
            return
        d = Delivery(tag, self.gen, queue, body, header, redelivered)
        if self.max_body and len(body) > self.max_body:
            self._too_large(d)
            return
        self.inflight += 1
        self.sinks[queue](d)

    def _too_large(self, d: Delivery) -> None:
        """Dead-letter a body over --max-body-size here, without handing it to the pool."""
        failure = Failure("body too large", BadMessage(
            f"body of {len(d.body)} bytes is larger than --max-body-size {self.max_body}"), retryable=False)
        try:
            decide(d, failure, None, self.copy_frame_max, self.queue_types.get(d.queue, "classic"))
        except Exception as exc:  # contained to this message, like the pool's failures
            dead_letter_plainly(d, failure, f"deciding its outcome failed ({type(exc).__name__}: {exc})")
        self.settlement.copy(d)

    def take_unstarted(self) -> list[Delivery]:
        """Empty the work queue of this generation's deliveries (older ones are dropped: their tags are gone)."""
        taken: list[Delivery] = []
        sentinels = 0
        while True:
            try:
                d = self.work.get_nowait()
            except Empty:
                break
            if d is None:
                sentinels += 1  # the pool's stop sentinels: not ours, put back below
            elif d.gen == self.gen:
                taken.append(d)
        for _ in range(sentinels):
            self.work.put(None)
        for take in self.unstarted_elsewhere:
            taken += take(self.gen)
        for tell in self.taken_back:
            tell(taken)
        return taken

    # -- frames from the broker ----------------------------------------------------------------
    def _on_frame(self, _channel: int, frame: Any) -> None:
        handler = self._handlers.get(type(frame))
        if handler is not None:
            handler(frame)
        else:
            log.debug("ignoring %s on the consuming connection", frame.name)

    def _on_basic_cancel(self, frame: commands.Basic.Cancel) -> None:
        """The broker cancelled one of a queue's two consumers: cancel the other too, so that consuming the queue
        again (both, after its declarations are checked) never leaves a second consumer on one of them."""
        queue = self.ctags.pop(frame.consumer_tag.encode(), None)
        if queue is None:
            return
        assert self.conn is not None
        for ctag in [t for t, q in self.ctags.items() if q == queue]:
            del self.ctags[ctag]  # what it still delivers is given back (_on_content: no such consumer)
            self.conn.call(CH, commands.Basic.Cancel(consumer_tag=ctag.decode()), (commands.Basic.CancelOk,))
        self.consuming.discard(queue)
        self.stats.cancels += 1
        backoff = Backoff(0.5, 30.0)
        delay = backoff.next()
        self.reconsume[queue] = (time.monotonic() + delay, backoff)
        log.warning("broker cancelled our consumer of queue %s (queue deleted, or its node is down); consuming it "
                    "again in %.1fs; the other queues go on", queue, delay, event="cancelled", queue=queue)
        if self.phase is Phase.CONNECTING:
            self._check_ready()

    def _on_channel_close(self, channel: int, exc: ChannelClosed) -> None:
        if channel == PROBE_CH and self._probe is not None and not (self.phase is Phase.CONNECTING
                                                                    and exc.code in (403, 406)):
            (queue, backoff), self._probe = self._probe, None
            delay = backoff.next()
            self.reconsume[queue] = (time.monotonic() + delay, backoff)
            log.warning("queue %s cannot be consumed now (%s); trying again in %.1fs; the other queues go on", queue,
                        exc.text, delay, event="reconsume_failed", queue=queue)
            if self.phase is Phase.CONNECTING:
                self._next_setup()
            return
        if self.phase is Phase.CONNECTING and exc.code in (403, 406):
            # The setup itself was refused: retrying cannot fix it (a queue declared with other
            # arguments, such as another queue type, or no permission on it).
            exc.permanent = True
            if exc.code == 406 and "inequivalent arg" in exc.text:
                dramatiqs = self._probe is not None and self._probe[0] in self.declarations  # (magne.formats)
                exc.args = (f"{exc}. {topology.mismatch_hint(dramatiqs)}",)
        raise exc  # the consuming channel is gone (its tags too), or setup was refused: reconnect or stop

    # -- timers --------------------------------------------------------------------------------
    def tick(self, now: float) -> float | None:
        conn = self.conn
        if conn is None:
            return None
        wake = conn.tick(now)
        if self.phase is Phase.CONSUMING and self.reconsume and self._probe is None:
            queue, (due, _b) = min(self.reconsume.items(), key=lambda kv: kv[1][0])
            if now >= due:
                self._start_probe(queue)
            else:
                wake = min(wake or due, due)
        return wake

    def _start_probe(self, queue: str, backoff: Backoff | None = None) -> None:
        """Declare a queue on the probe channel; consume it on the real one if that worked."""
        conn = self.conn
        assert conn is not None
        if backoff is None:
            _due, backoff = self.reconsume.pop(queue)
        self._probe = (queue, backoff)
        decls = self.declarations.get(queue) or topology.declarations(queue, self.queue_types.get(queue, "classic"),
                                                                      self.max_priorities.get(queue))
        conn.call(PROBE_CH, commands.Channel.Open(), (commands.Channel.OpenOk,))
        for method, reply in decls[:-1]:
            conn.call(PROBE_CH, method, (reply,))
        method, reply = decls[-1]
        conn.call(PROBE_CH, method, (reply,), lambda _ok: self._probe_passed(queue))

    def _probe_passed(self, queue: str) -> None:
        """The queue exists and is usable: close the probe channel (the next probe waits for its close-ok)
        and consume the queue on the real channel."""
        assert self.conn is not None
        if self.phase in (Phase.CONNECTING, Phase.CONSUMING):  # not while stopping: nobody would cancel it
            self._consume(queue)
        self.conn.call(PROBE_CH, commands.Channel.Close(200, "checked", 0, 0), (commands.Channel.CloseOk,),
                       lambda _ok: self._probe_closed())

    def _probe_closed(self) -> None:
        self._probe = None
        if self.phase is Phase.CONNECTING:
            self._next_setup()

    # -- stopping ---------------------------------------------------------------------------------
    def cancel_all(self) -> int:
        """Warm stop: cancel every consumer, give back what never started. Returns how many were given back."""
        assert self.conn is not None
        self.phase = Phase.CANCELLING
        for ctag in self.ctags:
            self.conn.call(CH, commands.Basic.Cancel(consumer_tag=ctag.decode()), (commands.Basic.CancelOk,))
        self.reconsume.clear()
        back = self.take_unstarted()
        self.settlement.give_back([d.tag for d in back])
        self.inflight -= len(back)
        return len(back)

    def close_channel(self) -> None:
        """Close the channel (the broker requeues whatever is unacked), then the connection."""
        conn = self.conn
        if conn is None or conn.state is not State.OPEN or self.phase in (Phase.CLOSING, Phase.CLOSED):
            return
        self.phase = Phase.CLOSING
        self.settlement.accepting = False  # nothing more may be written on this channel
        conn.call(CH, commands.Channel.Close(200, "worker stopping", 0, 0), (commands.Channel.CloseOk,),
                  lambda _ok: conn.close(time.monotonic(), "worker stopping"))

    def lost(self) -> tuple[int, int]:
        """The connection is gone: drop it and the unstarted deliveries. Returns (dropped, still running)."""
        dropped = len(self.take_unstarted())
        running = self.inflight - dropped
        if self.conn is not None:
            self.conn.abort()
        self.conn, self.phase = None, Phase.CLOSED
        self.gen += 1  # outcomes still to come from the old channel are now stale
        self.settlement.reset(self.gen, None)
        self.inflight = 0
        self.ctags.clear()
        self.consuming.clear()
        self.reconsume.clear()
        self._probe = None
        self._setup = []
        return dropped, running


def _count_delivery(tally: Tally, queue: str | None, redelivered: bool) -> None:
    """--metrics: a delivery by queue (I/O thread). A queue we no longer consume counts as "unknown"."""
    q = queue or "unknown"
    tally.delivered[q] = tally.delivered.get(q, 0) + 1
    if redelivered:
        tally.redelivered[q] = tally.redelivered.get(q, 0) + 1
