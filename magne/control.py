"""A worker process's control plane: cancels it must honour, and answers to `magne inspect`.

Both ride the process's publisher Client (magne/engine/client.py): no connection of their own, and nothing on the
I/O thread, whose consuming socket stays for task messages only.

- Cancels (magne.cancels): a Follower reads the cancels stream into the runner's CancelSet before the pool starts,
  then follows it. The worker's main thread calls `check` every tick: ids cancelled in the last few seconds are
  looked for among the running tasks (a thread task gets magne.Cancelled raised in it, an `async def` task is
  cancelled). Looking again for a few seconds closes the gap where a message passed the check in Runner.resolve
  just before its cancel arrived but had not started its clock yet.
- Inspect: the fanout exchange `magne.control`; each process binds a queue of its own to it and answers a request
  (`{"op": "inspect"}` with reply_to and correlation_id) with what it is and what it runs now (`Worker.inspect`).
  The queue is durable with `x-expires` rather than exclusive: it survives a reconnect of the client (an exclusive
  queue dies with its connection, and the client re-subscribes its consumers, not their queues), RabbitMQ 4.3
  accepts it (it refuses transient non-exclusive queues), and a killed process's queue goes away by itself; its
  requests expire in seconds (`x-message-ttl`), so a dead process answers nothing and keeps nothing.

Threads: `start` runs on a `magne-control` thread the worker starts (it waits for the broker); `_on_request` and the
Follower's records run on the client's loop thread and must not block; `check` and `stop` run on the main thread.
"""

from __future__ import annotations

import contextlib
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable
from typing import Any

import orjson
from pamqp import commands

from magne import __version__, cancels, controlguard, events, logs
from magne.amqp import codec, names
from magne.amqp.confirms import Returned
from magne.amqp.errors import ChannelClosed
from magne.amqp.url import Nodes
from magne.engine.client import Client
from magne.engine.message import Outgoing
from magne.engine.session import Delivered
from magne.publisher import Publisher, default_publisher

log = logs.Log("magne.control")

DEFAULT_EXCHANGE = "magne.control"
WATCH = 5.0  # seconds a fresh cancel is looked for among running tasks
QUEUE_EXPIRES_MS = 60_000  # a control queue nobody consumes goes away after this long (its process died)
REQUEST_TTL_MS = 5_000  # an inspect request is worth nothing after a few seconds
RETRY_AFTER = 30.0  # seconds between attempts to bind the control queue again


def exchange_name() -> str:
    """The control exchange: MAGNE_CONTROL_EXCHANGE, else magne.control (tests use their own)."""
    return os.environ.get("MAGNE_CONTROL_EXCHANGE") or DEFAULT_EXCHANGE


def declare_exchange(client: Client, name: str) -> None:
    client.call(names.ExchangeDeclare(exchange=name, exchange_type="fanout", durable=True),
                commands.Exchange.DeclareOk)


def publisher_for(nodes: Nodes, url: str | list[str] | None) -> tuple[Publisher, bool]:
    """The publisher whose Client the control plane rides: the process's default one when it points at the worker's
    broker (what a task's own sends use), else one of its own (True: the caller closes it)."""
    pub = default_publisher()
    if isinstance(pub, Publisher) and pub.nodes.all == nodes.all:
        return pub, False
    return Publisher(url), True


class Control:
    """Built by the worker's main thread. `inspect` gives this process's answer (called on the client's loop thread:
    it must read without locks and never block); `cancel_running(ids, now)` interrupts running tasks with those ids
    (main thread)."""

    def __init__(self, publisher: Publisher, cancels: cancels.CancelSet, inspect: Callable[[], dict[str, Any]],
                 cancel_running: Callable[[set[str], float], None], own: bool = False, listen: bool = True,
                 events: events.Events | None = None) -> None:
        self.publisher, self.own = publisher, own
        self.listen = listen  # --control on: follow cancels, answer inspect
        self.events = events  # --events on: the task events' buffer and flusher (magne.events)
        self.cancels = cancels
        self.inspect = inspect
        self.cancel_running = cancel_running
        self.ready = threading.Event()  # set once started (or given up on: the worker runs anyway)
        self.exchange = exchange_name()
        self.queue = f"{self.exchange}.{socket.gethostname()}.{os.getpid()}.{uuid.uuid4().hex[:8]}"
        self.follower: cancels.Follower | None = None
        self.client: Client | None = None
        self.lost = False  # the broker cancelled our control consumer (its queue expired): declare it again
        self._watch: dict[str, float] = {}  # id -> until when it is looked for among running tasks
        self._restarting = False
        self._retry_at = 0.0  # after a failed bind: not before then (a broker that refuses keeps refusing for a while)
        self.throttle = controlguard.Throttle()  # inspect requests answered a second (magne.controlguard)

    def start_in_background(self) -> None:
        if self.events is not None:
            self.events.start()
        if self.listen:
            threading.Thread(target=self._start, name="magne-control", daemon=True).start()
        else:
            self.ready.set()

    def _start(self) -> None:
        """magne-control thread: follow the cancels stream (waiting for the catch-up), bind the control queue. A broker
        that does not answer yet is tried again, the pool waiting (giving up let every cancel go unhonoured for the
        process's life); one that refuses (ChannelClosed: permissions) lets the pool run, and is tried again too."""
        delay = 1.0
        while True:
            try:
                client = self.client = self.publisher._running()
                self.follower = cancels.Follower(client, self.cancels)
                self.follower.start()
                break
            except Exception as exc:
                if self.follower is not None and self.follower.tag:  # subscribed, then failed: no second reader
                    with contextlib.suppress(Exception):
                        self.follower.stop()
                refused = isinstance(exc, ChannelClosed)
                log.error("cannot read the cancels stream (%s: %s); %s; trying again in %gs", type(exc).__name__,
                          logs.clean(str(exc), 200), "running without cancels meanwhile" if refused else
                          "tasks wait until cancels are known", delay, event="cancels_unavailable")
                if refused:
                    self.ready.set()
                time.sleep(delay)
                delay = min(RETRY_AFTER, delay * 2)
        self.ready.set()
        self._listen()

    def _listen(self) -> None:
        """magne-control thread: the control queue, bound and consumed."""
        try:
            client = self.client or self.publisher._running()
            declare_exchange(client, self.exchange)
            args = {"x-expires": QUEUE_EXPIRES_MS, "x-message-ttl": REQUEST_TTL_MS, "x-queue-type": "classic"}
            client.call(names.QueueDeclare(queue=self.queue, durable=True, arguments=args), commands.Queue.DeclareOk)
            client.call(names.QueueBind(queue=self.queue, exchange=self.exchange, routing_key=""),
                        commands.Queue.BindOk)
            client.consume(self.queue, self._on_request, prefetch=10, no_ack=True, on_cancel=self._on_lost)
            self.lost = False
        except Exception as exc:
            self.lost = True
            self._retry_at = time.monotonic() + RETRY_AFTER
            log.warning("cannot listen for inspect requests (%s: %s); trying again in %gs", type(exc).__name__,
                        logs.clean(str(exc), 200), RETRY_AFTER, event="control_unavailable")
        finally:
            self._restarting = False

    def _on_lost(self) -> None:
        self.lost = True  # client loop thread: the main thread's check declares it again

    # -- the main thread -------------------------------------------------------------------------------------------
    def check(self, now: float) -> None:
        """Every tick: look for freshly cancelled ids among running tasks; rebind a lost control queue."""
        fresh = self.cancels.fresh
        watch = self._watch
        while fresh:  # at most MAX_IDS watched: a flood of cancels must not make each tick scan millions of ids
            mid = fresh.popleft()
            if len(watch) >= cancels.MAX_IDS and mid not in watch:
                del watch[next(iter(watch))]  # the oldest watched makes room: the newest cancel is never the one lost
            watch[mid] = now + WATCH
        if watch:
            for mid in [m for m, until in watch.items() if until < now]:
                del watch[mid]
            if watch:
                self.cancel_running(watch, now)  # type: ignore[arg-type] - a dict: `in` is all they use
        follower = self.follower
        if follower is not None and follower.lost and now >= follower.retry_at:  # its reader ended: a new one
            follower.retry_at = now + RETRY_AFTER  # one attempt at a time, then one per RETRY_AFTER while it fails
            threading.Thread(target=follower.resume, name="magne-control", daemon=True).start()
        if self.lost and not self._restarting and self.ready.is_set() and now >= self._retry_at:
            self._restarting = True
            self.lost = False
            threading.Thread(target=self._listen, name="magne-control", daemon=True).start()

    def stop(self) -> None:
        """Main thread, at the end: flush the last events."""
        if self.events is not None:
            self.events.stop()
        # Consumers end with the connection; the control queue expires by itself (x-expires): nothing to delete.
        if self.own:
            self.publisher.close()

    # -- the client's loop thread ----------------------------------------------------------------------------------
    def _on_request(self, m: Delivered) -> None:
        """An inspect request: answer to its reply_to, unconfirmed (the inspector may be gone already)."""
        try:
            props = codec.decode_properties(m.header)  # a server-named reply queue only, so many a second
            if (not controlguard.reply_target_ok(props.reply_to) or not self.throttle.allow()
                    or orjson.loads(m.body).get("op") != "inspect"):
                return
            body = orjson.dumps(self.inspect(), default=str)
            reply = commands.Basic.Properties(content_type="application/json", correlation_id=props.correlation_id)
            header = codec.header_payload(reply, len(body))
            assert self.client is not None
            self.client.publish(Outgoing("", props.reply_to, header, body, None, deadline=time.monotonic() + 5.0))
        except Exception as exc:
            log.warning("an inspect request could not be answered (%s)", type(exc).__name__, event="bad_control")


def for_worker(worker: Any) -> Control:
    """The control plane of a worker process (magne.worker.Worker, typed Any: this module sits below the worker),
    made by its main thread at start: its runner's cancel set, its answer to inspect."""
    pub, own = publisher_for(worker.nodes, worker.opts.url)
    runner = worker.pool.runner
    runner.cancels = cancels.CancelSet(cancels.retention())
    started = time.time()

    ev = None
    if worker.opts.events:  # every outcome is recorded on its way back to the I/O thread
        ev = events.Events(pub._running)
        worker.pool.report = runner.report = ev.wrap(worker.pool.report)

    def cancel_running(ids: set[str], now: float) -> None:
        worker.pool.cancel_running(ids, now)
        if worker.aio is not None:
            worker.aio.cancel_running(ids, now)

    def inspect() -> dict[str, Any]:
        return snapshot(worker, started)

    return Control(pub, runner.cancels, inspect, cancel_running, own, worker.opts.control, ev)


def snapshot(worker: Any, started: float) -> dict[str, Any]:
    """What this process is and runs now, for `magne inspect`. Client loop thread: racy reads of the pool's slots and
    the event loop's runs (each a consistent-enough picture of one moment), no locks."""
    mono, wall = time.monotonic(), time.time()
    running: list[dict[str, Any]] = []
    for s in list(worker.pool.slots):
        d, began = s.delivery, s.started
        if d is None or s.clock is None:
            continue
        running.append({"kind": "thread", "thread": s.thread.name if s.thread else "?", "queue": d.queue,
                        "task": d.task, "message_id": cancels.id_of(d),
                        "started": wall - (mono - began) if began else None, "time_limit": s.limit})
    if worker.aio is not None:
        for run in list(worker.aio.running.values()):
            running.append({"kind": "async", "thread": "magne-asyncio", "queue": run.d.queue, "task": run.d.task,
                            "message_id": cancels.id_of(run.d),
                            "started": wall - (mono - run.started) if run.started else None, "time_limit": run.limit})
    return {"host": socket.gethostname(), "pid": os.getpid(), "version": __version__, "node": worker.io.node,
            "queues": list(worker.queues), "threads": worker.opts.threads, "started": started,
            "uptime": round(wall - started, 3), "busy": len(running), "running": running,
            "cancelled": worker.pool.runner.cancelled, "counters": worker.status()}


class Replies:
    """One reply queue per Client, kept for its life: an exclusive queue and its consumer, made on the first gather
    and again after a reconnect took it (the consumer's re-subscription is refused: on_cancel). Answers are routed to
    the gather waiting for their correlation id. Never cancelled: on RabbitMQ 3.10 the cancel-ok of a short-lived
    reply queue's consumer did not come, and the engine's channel, waiting for it, refused the next reply."""

    def __init__(self, client: Client) -> None:
        self.client = client
        self.queue = ""
        self.lock = threading.Lock()  # making the queue (gathering threads); the loop thread never takes it
        self.waiting: dict[str, list[dict[str, Any]]] = {}

    def ready(self) -> str:
        """A gathering thread: the reply queue's name, declared and consumed if needed."""
        with self.lock:
            if not self.queue:
                ok = self.client.call(names.QueueDeclare(queue="", exclusive=True), commands.Queue.DeclareOk)
                self.client.consume(ok.queue, self._on_reply, prefetch=100, no_ack=True, on_cancel=self._lost)
                self.queue = ok.queue
            return self.queue

    def _lost(self) -> None:
        self.queue = ""  # client loop thread: declared again by the next gather

    def _on_reply(self, m: Delivered) -> None:
        """Client loop thread: an answer, to the gather that waits for it (none: it came too late, dropped)."""
        try:
            got = self.waiting.get(codec.decode_properties(m.header).correlation_id or "")
            rec = orjson.loads(m.body) if got is not None else None
            if got is not None and controlguard.well_formed(rec):
                got.append(rec)
        except Exception:
            pass  # not an answer of ours


_replies: dict[int, Replies] = {}
_replies_lock = threading.Lock()


def gather(publisher: Any = None, wait: float = 1.0) -> list[dict[str, Any]]:
    """Ask every live worker process what it is and what it runs (magne inspect): the answers that came within
    `wait` seconds, by host and pid. Calling thread; on the given publisher's connection (the default's otherwise)."""
    pub = publisher if publisher is not None else default_publisher()
    client: Client = pub._running()
    with _replies_lock:
        for key in [k for k, r in _replies.items() if not r.client.alive]:
            del _replies[key]
        replies = _replies.setdefault(id(client), Replies(client))
    exchange = exchange_name()
    declare_exchange(client, exchange)
    queue = replies.ready()
    cid = uuid.uuid4().hex
    got: list[dict[str, Any]] = []
    replies.waiting[cid] = got
    try:
        props = commands.Basic.Properties(content_type="application/json", reply_to=queue, correlation_id=cid,
                                          expiration=str(REQUEST_TTL_MS))
        try:
            client.publish_confirmed(exchange, "", orjson.dumps({"op": "inspect", "at": time.time()}), props)
        except Returned:
            return []  # no worker process listens
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        replies.waiting.pop(cid, None)
    return sorted(list(got), key=lambda r: (str(r.get("host")), int(r.get("pid") or 0)))
