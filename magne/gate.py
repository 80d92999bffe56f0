"""Fleet-wide concurrency caps and rate limits: `@task(concurrency=3)`, `@task(rate="20/s")`, on RabbitMQ alone.

Caps. A durable classic queue `<queue>.cap.<N>` holds N token messages. A run of the task starts only
once its worker holds a token, leased (basic.get, unacked) on the `leases` session of the process's
engine Client (magne/engine/client.py), and gives it back (basic.nack requeue) when the run is decided.
A worker that dies, even by `kill -9`, loses its connection and the broker requeues its tokens at once.

Rates. A durable classic queue `<queue>.rate.<N>.<period ms>` holds N tokens. A start takes one (acked)
after publishing its replacement, confirmed, into `<...>.wait`, a queue whose message TTL is one period
and which dead-letters back into the tokens: at most N starts in any window of one period (a sliding
window; the burst is at most one period's worth).

Exactly N tokens. x-max-length=N with x-overflow=reject-publish counts only READY messages, so topping a
pool up while tokens are leased would add tokens. A pool is therefore filled once: the worker that holds
the exclusive queue `<pool>.init` (405 RESOURCE_LOCKED for the others) checks for the marker queue
`<pool>.filled`, and if there is none publishes N tokens (the max length refuses any left over by a
filler that died half-way: no worker leases before the marker exists, so they are all ready) and then
declares the marker. The token count is in the name: another N is another pool.

Where it sits. The I/O thread hands a delivery of a limited task's queue to `put` instead of the pool;
it waits in the gate, unacked on the consuming channel, holding no pool thread, until the gate's thread
`magne-gate` has its token(s), then goes on to the pool (or the event loop). Its outcome comes back
through `report` (pool threads, the event loop's thread), which gives the cap token back. A waiting
message is not a failure and costs no retry. Queues without a limit never pass here.
"""

from __future__ import annotations

import dataclasses
import hashlib
import re
import threading
from collections import deque
from collections.abc import Callable
from typing import Any

from pamqp import commands

from magne import logs
from magne.amqp import names
from magne.amqp.confirms import Nacked, Returned
from magne.amqp.errors import ChannelClosed
from magne.delivery import Delivery
from magne.engine.client import Client
from magne.errors import ConfigError

log = logs.Log("magne.gate")

PERIODS = {"s": 1.0, "m": 60.0, "h": 3600.0}
_RATE = re.compile(r"^\s*(\d+)\s*/\s*([smh])\s*$")
POLL_MIN, POLL_MAX = 0.005, 0.05  # how often a gate with waiting messages asks an empty pool again
TOKEN = commands.Basic.Properties(delivery_mode=2)


@dataclasses.dataclass(frozen=True)
class Limit:
    """A task's fleet-wide limits: at most `concurrency` runs at once, at most `rate[0]` starts per `rate[1]` s."""

    concurrency: int | None = None
    rate: tuple[int, float] | None = None


def limit_of(concurrency: Any, rate: Any) -> Limit | None:
    """The registry's check (ValueError with the reason): None when the task has no limit."""
    if concurrency is None and rate is None:
        return None
    if concurrency is not None and (type(concurrency) is not int or not 1 <= concurrency <= 10_000):
        raise ValueError(f"concurrency= must be an int from 1 to 10000, got {concurrency!r}")
    parsed = None
    if rate is not None:
        m = _RATE.match(rate) if isinstance(rate, str) else None
        if m is None or not 1 <= int(m.group(1)) <= 100_000:
            raise ValueError(f"rate= must be 'N/s', 'N/m' or 'N/h' with N from 1 to 100000, got {rate!r}")
        parsed = (int(m.group(1)), PERIODS[m.group(2)])
    return Limit(concurrency, parsed)


def _base(name: str) -> str:
    """A pool's name, with room for its longest suffix (`.filled`); hashed if the queue name leaves none."""
    if len(name.encode()) <= names.MAX_BYTES - len(".filled"):
        return name
    return f"magne.pool.{hashlib.sha256(name.encode()).hexdigest()}"


class Pool:
    """One pool of tokens (a cap's or a rate's) and how it is made. Immutable once built."""

    def __init__(self, queue: str, kind: str, size: int, period: float | None = None) -> None:
        self.size, self.period = size, period
        base = f"{queue}.cap.{size}" if kind == "cap" else f"{queue}.rate.{size}.{int((period or 0) * 1000)}"
        self.tokens = _base(base)
        self.filled, self.init, self.wait = (f"{self.tokens}{s}" for s in (".filled", ".init", ".wait"))

    def declarations(self) -> list[Any]:
        args: dict[str, Any] = {"x-queue-type": "classic", "x-max-length": self.size, "x-overflow": "reject-publish"}
        out = [names.QueueDeclare(queue=self.tokens, durable=True, arguments=args)]
        if self.period is not None:
            out.append(names.QueueDeclare(queue=self.wait, durable=True, arguments={
                "x-queue-type": "classic", "x-message-ttl": int(self.period * 1000), "x-dead-letter-exchange": "",
                "x-dead-letter-routing-key": self.tokens}))
        return out


class _Waiting:
    """The deliveries of one limited queue waiting for their token(s), and that queue's pools."""

    def __init__(self, queue: str, limit: Limit, sink: Callable[[Delivery], None]) -> None:
        self.queue, self.limit, self.sink = queue, limit, sink
        self.cap = Pool(queue, "cap", limit.concurrency) if limit.concurrency else None
        self.rate = Pool(queue, "rate", limit.rate[0], limit.rate[1]) if limit.rate else None
        self.ready = False  # its pools exist and are filled
        self.items: deque[Delivery] = deque()


class Gate:
    """The worker's gate for its limited queues (built by magne.worker when a task has a limit)."""

    def __init__(self, client: Callable[[], Client], limits: dict[str, Limit],
                 sinks: dict[str, Callable[[Delivery], None]], report: Callable[[Delivery], None],
                 gen: Callable[[], int] = lambda: 0) -> None:
        self.client, self.after = client, report
        self.gen = gen  # the consuming channel's generation now (a racy read of an int, from the gate's thread)
        self.queues = {q: _Waiting(q, lim, sinks[q]) for q, lim in limits.items()}
        self.held: dict[tuple[str, int, int], tuple[Client, int, int]] = {}  # (queue, gen, tag) -> client, lease
        self.lock = threading.Lock()  # the waiting deques: the I/O thread appends and takes back, the gate pops
        self.wake = threading.Event()
        self.stopped = threading.Event()
        self.slot_waits = self.rate_waits = self.admitted = 0  # times a pool was found empty; deliveries let through
        self.thread = threading.Thread(target=self._main, name="magne-gate", daemon=True)

    # -- the I/O thread ------------------------------------------------------------------------------------
    def put(self, d: Delivery) -> None:
        """The consumer's sink for a limited queue: park the delivery (no pool thread) until its token comes."""
        with self.lock:
            self.queues[d.queue].items.append(d)
        self.wake.set()

    def take_unstarted(self, gen: int) -> list[Delivery]:
        """A warm stop or a lost connection: the waiting deliveries of `gen` go back (older ones are dropped: their
        tags died with their channel and the broker requeued them)."""
        out: list[Delivery] = []
        with self.lock:
            for w in self.queues.values():
                out += [d for d in w.items if d.gen == gen]
                w.items.clear()
        return out

    def taken_back(self, taken: list[Delivery]) -> None:
        """Deliveries the consumer took back from the pool's work queue unstarted: give their tokens back."""
        for d in taken:
            self._release(d)

    # -- pool threads, the event loop's thread -----------------------------------------------------------------
    def report(self, d: Delivery) -> None:
        """A run was decided: give its cap token back (a non-blocking nack), then hand the outcome on."""
        if d.queue in self.queues:
            self._release(d)
        self.after(d)

    def _release(self, d: Delivery) -> None:
        lease = self.held.pop((d.queue, d.gen, d.tag), None)  # one atomic dict operation
        if lease is not None:
            lease[0].release(*lease[1:])  # the Client it came from: a new one's leases channel has other tags
            self.wake.set()  # a local waiter may take it at once

    # -- main thread -------------------------------------------------------------------------------------
    def start(self) -> None:
        self.thread.start()

    def stop(self) -> None:
        self.stopped.set()
        self.wake.set()
        self.thread.join(2.0)

    def status(self) -> dict[str, int]:
        return {"limit_slots_held": len(self.held), "limit_waiting": sum(len(w.items) for w in self.queues.values()),
                "limit_slot_waits": self.slot_waits, "limit_rate_waits": self.rate_waits,
                "limit_admitted": self.admitted}

    # -- the gate's thread --------------------------------------------------------------------------------
    def _main(self) -> None:
        poll = POLL_MIN
        while not self.stopped.is_set():
            self.wake.clear()
            starved = progressed = False
            for w in self.queues.values():
                try:
                    while w.items and not self.stopped.is_set():
                        if not self._admit(w):
                            starved = True
                            break
                        progressed = True
                except Exception as exc:  # a broker fault (the Client reconnects), or a bug: ask again shortly
                    if isinstance(exc, Returned) or isinstance(exc, ChannelClosed) and exc.code == 404:
                        w.ready = False  # a pool (or a rate's .wait) deleted under us: declared again, refilled if unmarked
                    log.warning("gate of %s: %s: %s; trying again", w.queue, type(exc).__name__, exc,
                                event="gate_error", queue=w.queue)
                    starved = True
            poll = POLL_MIN if progressed or not starved else min(POLL_MAX, poll * 2)
            self.wake.wait(poll if starved else 1.0)

    def _admit(self, w: _Waiting) -> bool:
        """Take the token(s) for the oldest waiting delivery of `w` and hand it on; False if a pool is empty."""
        client = self.client()
        if not w.ready and not self._ensure(client, w):
            return False
        lease = token = None
        try:
            if w.cap is not None:
                lease = client.lease(w.cap.tokens)
                if lease is None:
                    self.slot_waits += 1
                    return False
            if w.rate is not None:
                token = client.lease(w.rate.tokens)
                if token is None:
                    self.rate_waits += 1
                    return self._give_back(client, lease)
                # The token comes back one period from now; only then is this one spent.
                client.publish_confirmed("", w.rate.wait, b"", TOKEN)
                client.ack(token[0], token[1], session=client.leases)
                token = None
        except BaseException:  # a broker fault half-way: nothing leased may stay held
            self._give_back(client, lease, token)
            raise
        with self.lock:
            d = w.items.popleft() if w.items else None
        if d is None or d.gen != self.gen():  # taken back meanwhile, or its channel is gone (the broker requeued it)
            self._give_back(client, lease)
            return True
        if lease is not None:
            self.held[(d.queue, d.gen, d.tag)] = (client, *lease)
        self.admitted += 1
        w.sink(d)
        return True

    @staticmethod
    def _give_back(client: Client, *leases: tuple[int, int] | None) -> bool:
        for lease in leases:
            if lease is not None:
                client.release(*lease)
        return False

    def _ensure(self, client: Client, w: _Waiting) -> bool:
        """Make sure `w`'s pools exist and were filled exactly once (module docstring); False: not yet."""
        for pool in (w.cap, w.rate):
            if pool is not None and not self._filled(client, pool):
                return False
        w.ready = True
        return True

    def _filled(self, client: Client, pool: Pool) -> bool:
        if _exists(client, pool.filled):
            for method in pool.declarations():  # the same arguments: a 406 here means another size was declared
                client.call(method, commands.Queue.DeclareOk, session=client.locks)
            return True
        try:
            client.call(names.QueueDeclare(queue=pool.init, exclusive=True, durable=False), commands.Queue.DeclareOk,
                        session=client.locks)
        except ChannelClosed:
            return False  # another worker is filling it (405): ask again shortly
        try:
            if not _exists(client, pool.filled):
                for method in pool.declarations():
                    client.call(method, commands.Queue.DeclareOk, session=client.locks)
                outcomes = client.publish_copies("", pool.tokens, TOKEN, pool.size)
                refused = sum(isinstance(e, Nacked) for e in outcomes)  # reject-publish: left by a filler that died
                for e in outcomes:  # half-way; anything else raises: no marker then, and the next filler starts again
                    if e is not None and not isinstance(e, Nacked):
                        raise e
                client.call(names.QueueDeclare(queue=pool.filled, durable=True), commands.Queue.DeclareOk,
                            session=client.locks)
                log.info("made the token pool %s: %d tokens%s", pool.tokens, pool.size,
                         f" ({refused} were there already)" if refused else "", event="limit_pool_made",
                         queue=pool.tokens)
        finally:
            client.call(names.QueueDelete(queue=pool.init), commands.Queue.DeleteOk, session=client.locks)
        return True


def _exists(client: Client, queue: str, tries: int = 3) -> bool:
    try:
        client.call(names.QueueDeclare(queue=queue, passive=True), commands.Queue.DeclareOk, session=client.locks)
    except ChannelClosed as exc:
        if exc.code == 404:
            return False
        if queue[:100] not in exc.text and tries > 1:  # a scheduler's 405 on the shared locks channel, not ours
            return _exists(client, queue, tries - 1)
        raise
    return True


def install(tasks: dict[str, Any], queues: list[str], consumer: Any, pool: Any, prefetch: int,
            client: Callable[[], Client]) -> Gate | None:
    """Put a gate in front of every consumed queue whose task has a limit (magne.worker, before the threads
    start): the consumer's sink for it, the report of the pool (and the event loop) through it, a prefetch no
    larger than the limit needs (what waits, waits unacked on the consuming channel). ConfigError if a limited
    task shares its queue: the gate knows a delivery's limit by its queue, without decoding it."""
    limits: dict[str, Limit] = {}
    for t in tasks.values():
        if t.limit is None or t.queue not in queues:
            continue
        others = sorted(o.name for o in tasks.values() if o.queue == t.queue and o is not t)
        if others:
            raise ConfigError(f"task {t.name} has a fleet-wide limit (concurrency=/rate=) and shares queue {t.queue} "
                              f"with {', '.join(others)}; give it a queue of its own (@task(queue=...))")
        limits[t.queue] = t.limit
    if not limits:
        return None
    gate = Gate(client, limits, {q: consumer.sinks[q] for q in limits}, pool.report, lambda: consumer.gen)
    for q, lim in limits.items():
        consumer.sinks[q] = gate.put
        need = (lim.concurrency or 0) + 1 if lim.rate is None else max(lim.concurrency or 0, lim.rate[0]) + 1
        consumer.prefetches[q] = min(consumer.prefetches.get(q, prefetch), need)
    consumer.unstarted_elsewhere.append(gate.take_unstarted)
    consumer.taken_back.append(gate.taken_back)
    pool.report = pool.runner.report = gate.report
    return gate
