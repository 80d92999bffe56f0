"""The worker's I/O thread: the engine loop (magne/engine/loop.py) with the worker's two endpoints.

The loop watches the consuming connection (io/consumer.py), the publishing link (an engine Sender)
and the Waker. Worker threads hand outcomes back with `report()`: append to a deque and, if
no wake-up is pending, wake the loop once; the I/O thread clears the flag before draining, so
a batch of outcomes costs one wake-up (about 4 us/msg here, against 18 us/msg for one wake-up
per ack, issue 2's figures). Each turn, after the loop read what arrived, `_turn` settles the
outcomes (io/settle.py) and advances a shutdown; the loop then writes.

It never runs user code, never takes a lock that task code can take (it logs through
magne.logs), and never waits on anything but its selector: connects, name resolution and
handshakes are non-blocking (magne/engine). A failure of the consuming connection schedules a
reconnect by its Reconnector; a failure of the link only delays the copies. Any exception
while handling one message is contained to that message in settle.py; one that still escapes
ends the thread with a log line, and the worker exits (its unacked messages return to the queue).
"""

from __future__ import annotations

import enum
import threading
import time
from collections import deque
from collections.abc import Callable
from queue import SimpleQueue

from magne import logs
from magne.amqp.errors import AMQPError, BrokerTimeout, ChannelClosed, ConnectionClosed, ConnectionLost, FrameError, TLSError
from magne.amqp.protocol import DEFAULT_FRAME_MAX
from magne.amqp.url import Nodes, Params
from magne.backoff import Backoff
from magne.delivery import Delivery
from magne.engine.connection import Connection, State
from magne.engine.loop import Loop
from magne.engine.reconnect import Reconnector
from magne.engine.sender import Sender
from magne.io.consumer import Consumer, Phase
from magne.io.settle import Settlement
from magne.io.stats import Stats, Tally
from magne.naming import connection_name

log = logs.Log("magne.io")

CLOSE_GRACE = 5.0  # how long a stop waits for the broker's close-oks
LINK_STALL = 120.0  # seconds without a confirm (while not blocked) after which the publishing link is given up


class Stop(enum.IntEnum):
    RUNNING = 0
    WARM = 1  # cancel, give back the unstarted, wait for the running, close
    COLD = 2  # close now: the broker requeues what is unacked


class IOThread(threading.Thread):
    def __init__(self, nodes: Nodes | Params, queues: list[str], prefetch: int, work: SimpleQueue[Delivery | None],
                 queue_types: dict[str, str] | None = None, max_body: int = 0, copy_frame_max: int = DEFAULT_FRAME_MAX,
                 consumer_timeouts: dict[str, int] | None = None, tally: Tally | None = None) -> None:
        super().__init__(name="magne-io", daemon=True)
        self.nodes = nodes if isinstance(nodes, Nodes) else Nodes([nodes])
        self.queues = queues
        self.stats = Stats()
        self.stats.tally = tally  # --metrics: per-queue/task counts, lag, ack batches (magne/io/stats.py)
        self._lost_cause = ""  # why the consuming connection was last lost: the label of the reconnect that follows
        self.ready = threading.Event()
        self.finished = threading.Event()
        # Called on this thread once `ready` or `finished` is set, so that the main thread waiting for either acts at
        # once rather than at its next 0.1 s poll (the worker passes its signal pipe's wake-up: one os.write, no lock).
        # That poll cost 50 ms on average between consuming and starting the pool, while prefetched messages waited.
        self.wake_main: Callable[[], None] = lambda: None
        self.failed: str | None = None  # why the worker could not run (first connection, or a crash)
        self.permanent = False  # the failure is one retrying cannot fix (login, vhost, permissions)
        self.outcomes: deque[Delivery] = deque()
        self._wake_pending = False
        self.loop = Loop()
        self._wake = self.loop.waker.wake
        self._stopping = Stop.RUNNING
        # The publishing link: the engine's Sender on a connection of its own (a broker alarm blocks a connection that
        # publishes, and acks must go on), opened when there are copies to make; heartbeats off (it may sit blocked for
        # as long as an alarm lasts), a confirm overdue LINK_STALL seconds while not blocked means it is dead.
        self.link = Sender(self.nodes, connection_name("magne worker publisher", queues), heartbeat=0, window=65535,
                           stall_timeout=LINK_STALL, follows=True)
        self.settlement = Settlement(self.link, self.stats, copy_frame_max)
        if tally is not None:
            self.link.on_latency = tally.confirm.observe
        self.consumer = Consumer(self.nodes, connection_name("magne worker", queues), queues, prefetch, queue_types or {},
                                 work, self.settlement, self.stats, max_body, copy_frame_max, self._on_consuming,
                                 consumer_timeouts or {})
        self.reconnector = Reconnector(self.nodes, Backoff())
        self._reconnect_at = 0.0
        self._close_deadline = 0.0
        self.loop.endpoints += [_ConsumerEnd(self), _LinkEnd(self)]
        if tally is not None:
            self.loop.on_lag = tally.lag.observe

    # -- called from other threads -----------------------------------------------------------
    def report(self, d: Delivery) -> None:
        """Pool threads: hand back a finished delivery (lock-free: deque + flag + the loop's Waker)."""
        self.outcomes.append(d)
        if not self._wake_pending:
            self._wake_pending = True
            self._wake()

    def request_stop(self, force: bool = False) -> None:
        """Main thread: stop warmly, or (force) now."""
        self._stopping = max(self._stopping, Stop.COLD if force else Stop.WARM)
        self._wake()

    @property
    def inflight(self) -> int:
        return self.consumer.inflight

    # -- the thread --------------------------------------------------------------------------------
    def run(self) -> None:
        try:
            self._run()
        except _Done:
            pass
        except BaseException as exc:  # noqa: B036 - the I/O thread must never vanish silently
            log.exception("I/O thread crashed: %s; the worker will exit and its unacked messages return to the queue", exc,
                          event="io_crashed")
            if self.failed is None:
                self.failed = f"I/O thread crashed: {exc}"
        finally:
            if self.consumer.conn is not None:
                self.consumer.conn.abort()
            self.link.abort()
            self.finished.set()
            self.wake_main()

    def _run(self) -> None:
        self._connect(time.monotonic())
        self.loop.run(self._turn, self._own_timers)

    def _turn(self, now: float) -> bool:
        """After each turn's reads: settle what the pool handed back, advance a stop. True: the thread ends."""
        self._wake_pending = False  # before draining: see report()
        if self.outcomes:
            self.consumer.inflight -= self.settlement.drain(self.outcomes, now)
        return bool(self._stopping) and self._stop_step(now)

    def _own_timers(self, now: float) -> float | None:
        return self._close_deadline or None

    # -- the consuming connection ------------------------------------------------------------------
    @property
    def node(self) -> str:
        """The node the consuming connection uses (or will use next), as it is safe to log."""
        return self.nodes.current.safe_url()

    def _on_consuming(self) -> None:
        self.reconnector.opened(time.monotonic())
        if self.ready.is_set():
            self.stats.reconnects += 1
            cause = self._lost_cause or "unknown"
            self.stats.reconnect_causes[cause] = self.stats.reconnect_causes.get(cause, 0) + 1
            log.info("reconnected to %s; consuming %s again", self.node, ", ".join(self.queues),
                     event="reconnected", url=self.node)
        else:
            self.ready.set()
            self.wake_main()

    def _consumer_failed(self, exc: AMQPError, now: float) -> None:
        """The consuming connection failed: move to the next node; back off only once every node failed in a row
        (engine/reconnect.py). A node shutting down (320 CONNECTION_FORCED) is left at once for the next one."""
        was_open = self.consumer.phase is not Phase.CONNECTING
        failed_node = self.node
        dropped, running = self.consumer.lost()
        delay, round_failed = self.reconnector.failed(exc, now, was_open)
        if self._stopping:
            raise _Done  # stopping anyway: the broker requeues what is unacked
        if not self.ready.is_set() and (round_failed or exc.permanent):
            self.failed, self.permanent = str(exc), exc.permanent
            raise _Done
        if was_open:
            self._lost_cause = loss_cause(exc)
        else:
            self.stats.connect_failures += 1
        self._reconnect_at = now + delay
        if was_open:
            log.warning("connection to %s lost: %s; reconnecting to %s in %.1fs. %d prefetched messages dropped "
                        "unstarted, %d tasks keep running (their outcomes cannot be acked on a new channel, so those "
                        "messages will be redelivered)", failed_node, exc, self.node, delay, dropped, running,
                        event="connection_lost", url=failed_node)
        else:
            log.warning("connecting to %s failed: %s; next attempt to %s in %.1fs", failed_node, exc, self.node, delay,
                        event="reconnect_failed", url=failed_node)

    def _connect(self, now: float) -> None:
        try:
            self.consumer.connect(now)
        except AMQPError as exc:  # an immediate failure (unreachable network, no sockets left)
            self._consumer_failed(exc, now)

    # -- timers (the loop's endpoints) ----------------------------------------------------------------------
    def _consumer_tick(self, now: float) -> float | None:
        c = self.consumer
        if c.conn is None:
            if self._stopping:
                return None
            if now < self._reconnect_at:
                return self._reconnect_at
            self._connect(now)
            return now if c.conn is None else None
        return c.tick(now)

    def _link_tick(self, now: float) -> float | None:
        wakes = [w for w in (self.link.tick(now), self.settlement.service(now)) if w is not None]
        return min(wakes) if wakes else None

    def _link_busy(self) -> bool:
        return self.link.busy() or bool(self.settlement.waiting)

    # -- stopping ----------------------------------------------------------------------------------------
    def _stop_step(self, now: float) -> bool:
        """Advance a stop; True when the thread may end."""
        c = self.consumer
        if c.conn is None:
            return True  # nothing to close (reconnecting, or closed)
        if c.phase is Phase.CONNECTING:
            c.lost()  # the unstarted deliveries of the channel being set up go with it
            return True
        if c.phase is Phase.CONSUMING:
            back = c.cancel_all()
            log.info("stopping: consumers cancelled, %d prefetched messages given back, waiting for %d running tasks",
                     back, c.inflight, event="stopping")
        if c.phase is Phase.CANCELLING:
            # Copies on their way are waited for; copies the broker refused (waiting for their backoff) are not: they
            # could hold a stop forever. Their originals go back to the queue unacked (they will run again).
            copies = self.link.pending()
            refused = len(self.settlement.waiting)
            if self._stopping is Stop.COLD or (c.inflight <= 0 and not copies):
                if c.inflight > 0 or copies or refused:
                    log.warning("closing with %d tasks unfinished, %d copies unconfirmed and %d copies refused by the "
                                "broker; the broker requeues their messages", c.inflight, copies, refused,
                                event="closing_unfinished")
                c.close_channel()
                self.link.close(now)
                self._close_deadline = now + CLOSE_GRACE
        if self._close_deadline and now >= self._close_deadline:
            log.warning("broker did not answer the close within %gs; dropping the connection", CLOSE_GRACE)
            return True
        return c.conn.state is State.CLOSED and self.link.conn is None


def loss_cause(exc: AMQPError) -> str:
    """A lost connection's cause, as a metric label (a fixed set: magne_reconnects_total{cause})."""
    if isinstance(exc, ConnectionClosed):
        return "node_shutdown" if exc.code == 320 else "closed_by_broker"
    if isinstance(exc, ChannelClosed):
        return "channel_closed"  # 406 from consumer_timeout, say: the channel's tags are gone
    if isinstance(exc, BrokerTimeout):
        return "timeout"
    if isinstance(exc, TLSError):
        return "tls"
    if isinstance(exc, FrameError):
        return "protocol_error"
    if isinstance(exc, ConnectionLost):
        return "heartbeat_missed" if str(exc).startswith("missed heartbeats") else "connection_lost"
    return "other"


class _Done(Exception):
    """Ends the loop from inside a failure handler."""


class _ConsumerEnd:
    """The consuming connection as an engine endpoint."""

    def __init__(self, io: IOThread) -> None:
        self.io = io

    @property
    def conn(self) -> Connection | None:
        return self.io.consumer.conn

    def tick(self, now: float) -> float | None:
        return self.io._consumer_tick(now)

    def failed(self, exc: AMQPError, now: float) -> None:
        self.io._consumer_failed(exc, now)

    def busy(self) -> bool:
        io = self.io
        c = io.consumer
        return bool(io._stopping or c.conn is None or c.phase is not Phase.CONSUMING)


class _LinkEnd:
    """The publishing link (and the copies waiting for it) as an engine endpoint."""

    def __init__(self, io: IOThread) -> None:
        self.io = io

    @property
    def conn(self) -> Connection | None:
        return self.io.link.conn

    def tick(self, now: float) -> float | None:
        return self.io._link_tick(now)

    def failed(self, exc: AMQPError, now: float) -> None:
        self.io.link.failed(exc, now)

    def busy(self) -> bool:
        return self.io._link_busy()
