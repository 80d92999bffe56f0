"""Fleet-wide periodic tasks: which worker sends the ticks (an election per schedule), and the sending.

Election: every candidate worker (its task modules define schedules, and it was not started with
`--no-scheduler`) tries, about once a second, to declare an EXCLUSIVE queue `<stream>.leader.<task>`
on the process's engine Client (the default Publisher's, magne/engine/client.py; its `locks` session, where
a refusal disturbs nothing else). RabbitMQ gives an
exclusive queue to one connection and deletes it the moment that connection dies (`kill -9`, a lost
node, a network cut once the broker notices); every other candidate is refused with 405
RESOURCE_LOCKED (a channel close the Session survives). So at any time at most one connection leads
each schedule, with no extra process and nothing to configure. One lock per schedule, not one for
the fleet: two applications on one vhost, or a deploy that adds a schedule, never leave a schedule
without a leader that knows it.

Ticks: one confirmed, mandatory publish to the direct exchange `<stream>` with the task's queue as
routing key; the task queue and the stream `<stream>` (a RabbitMQ stream, x-max-age 7 days) are both
bound with it, so the same publish records the tick and enqueues the run, or does neither. A tick is
an ordinary task message whose id is `<task>@<due time>` (magne.schedule.tick_id).

Failover: a new leader first writes a marker into the stream and reads the stream from a little
before the last due time it can have missed up to that marker: the last recorded due time of each
schedule it now leads. It sends every due time after it that is at most `grace` seconds late, and
skips (with a log line) older ones: no due time is enqueued twice nor skipped across a failover, and
a long outage is not replayed N times. Partitions: docs/schedules.md.

Threads: the scheduler's own thread `magne-scheduler` does all of it; the stream's messages arrive on
the Client's loop thread (`_read_tail`'s callback, which only records and acks). The worker's main
thread calls start() and stop().
"""

from __future__ import annotations

import datetime as dt
import hashlib
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable
from typing import Any

from pamqp import commands

from magne import logs, topology, wire
from magne.amqp import codec, names
from magne.amqp.errors import ChannelClosed, MagneError
from magne.engine.client import Client
from magne.engine.session import Delivered
from magne.registry import Task
from magne.schedule import UTC, Schedule, parse_tick_id, tick_id

log = logs.Log("magne.scheduler")

STREAM = "magne.schedule"
MAX_AGE = "7D"  # how long the stream keeps ticks (x-max-age)
MAX_LOOKBACK = 6 * 86400.0  # seconds a new leader reads back at most (within MAX_AGE)
RESOURCE_LOCKED = 405
TAIL_TIMEOUT = 15.0
REDECLARE = 60.0  # seconds between declarations of a leader's exchange, stream, task queues and bindings
CHECKPOINT = "x-magne-checkpoint"  # header of a leader's checkpoint record in the stream (its value: host/pid)


def lock_name(stream: str, task: str) -> str:
    """The exclusive queue whose holder leads `task`'s schedule (hashed if the name would not fit 255 bytes)."""
    name = f"{stream}.leader.{task}"
    if len(name.encode()) > names.MAX_BYTES:
        name = f"{stream}.leader.{hashlib.sha256(task.encode()).hexdigest()}"
    return name


def stream_declaration(stream: str) -> Any:
    return names.QueueDeclare(queue=stream, durable=True, arguments={"x-queue-type": "stream", "x-max-age": MAX_AGE})


def tick_message(task: Task, due: dt.datetime, who: str) -> tuple[bytes, bytes]:
    """(header payload, body) of the run of `task` due at `due`: a task message with the tick's id and headers
    saying which schedule, which due time and which process sent it."""
    mid = tick_id(task.name, due)
    body = wire.encode(task.name, (), None, mid)
    props = wire.properties_for(mid)
    props.priority = task.priority
    props.headers = {"x-magne-schedule": task.name, "x-magne-due": due.isoformat(), "x-magne-scheduler": who}
    return codec.header_payload(props, len(body)), body


class Scheduler:
    """This process's candidacy for every schedule of its tasks, and the ticks of the ones it leads."""

    def __init__(self, client: Callable[[], Client], tasks: list[Task], stream: str = STREAM,
                 queue_type: str = "classic", grace: float = 300.0, retry: float = 1.0,
                 clock: Callable[[], float] = time.time) -> None:
        self.client, self.stream, self.queue_type = client, stream, queue_type
        self.tasks = {t.name: t for t in tasks if t.schedule is not None}
        self.grace, self.retry, self.clock = grace, retry, clock
        self.who = f"{socket.gethostname()}/{os.getpid()}"
        self.led: dict[str, dt.datetime] = {}  # schedule -> its next due time, for those this process leads
        self.conn: Any = None  # the Session connection our locks belong to
        self.next_try = 0.0
        self.redeclare_at = 0.0  # the bindings ticks go through are declared again now and then (a queue deleted and
        # made again by a worker that knows nothing of them would otherwise get no tick: they would reach the stream only)
        self.sent = self.skipped = self.won = 0  # counters (status, metrics)
        self._stop = threading.Event()
        self.thread = threading.Thread(target=self._main, name="magne-scheduler", daemon=True)

    # -- main thread ---------------------------------------------------------------------------------------
    def start(self) -> None:
        log.info("scheduler candidate for %d schedules: %s", len(self.tasks),
                 ", ".join(f"{n} ({t.schedule.describe()})" for n, t in self.tasks.items() if t.schedule),
                 event="scheduler_candidate")
        self.thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        """Stop sending ticks and give the locks up at once (another worker takes over within its retry). Main
        thread, when the worker begins to shut down."""
        self._stop.set()
        self.thread.join(timeout)

    def leading(self) -> list[str]:
        return sorted(self.led)

    # -- the scheduler's thread --------------------------------------------------------------------------------
    def _main(self) -> None:
        while not self._stop.is_set():
            try:
                self._turn()
            except Exception as exc:  # a broker fault: the next turn tries again (the Client reconnects)
                log.warning("scheduler: %s: %s; trying again", type(exc).__name__, exc, event="scheduler_error")
                self._stop.wait(self.retry)
                continue
            self._stop.wait(self._pause())
        self._release(list(self.led))

    def _pause(self) -> float:
        now = self.clock()
        waits = [self.retry]  # at least once per retry: notice a lost lock, try for the others
        waits += [(due.timestamp() - now) for due in self.led.values()]
        return max(0.005, min(waits))

    def _turn(self) -> None:
        client = self.client()
        if self.led and client.locks.conn is not self.conn:
            log.warning("scheduler: the connection holding the leader locks of %s was replaced; they are lost and "
                        "another worker may lead now", ", ".join(self.led), event="leader_lost", schedules=list(self.led))
            self.led.clear()
        trying = time.monotonic() >= self.next_try  # once per retry: confirm the locks we hold, try for the others
        if trying:
            self.next_try = time.monotonic() + self.retry
            self._confirm(client)
        unled = [n for n in self.tasks if n not in self.led]
        if unled and trying:
            won, conns = [], set()
            for n in unled:
                if self._acquire(client, n):
                    won.append(n)
                    conns.add(id(client.locks.conn))  # the connection the lock just went to (read at once)
            conn = client.locks.conn
            if won and (conns != {id(conn)} or (self.led and conn is not self.conn)):
                self._release(won)  # the connection changed under the calls: do not trust what we think we hold
                won = []
            if won:
                self.conn = conn
                try:
                    self._take_over(client, won)
                    self._checkpoint(client, won)
                except BaseException:
                    self._release(won)  # never hold a lock without leading: another worker leads it then
                    raise
        if self.led and time.monotonic() >= self.redeclare_at:
            self._declare(client, list(self.led))
            self._checkpoint(client, list(self.led))
        self._fire(client)

    def _checkpoint(self, client: Client, schedules: list[str]) -> None:
        """Record in the stream, for each schedule we lead, an instant up to which every due time was dealt with
        (just before the next one). A new leader reads back at most MAX_LOOKBACK: without these a weekly or monthly
        schedule's last tick is out of its sight, and a failover just after a due time skipped that tick. At a
        take-over and then every REDECLARE seconds; stream only (the default exchange), never a run."""
        for name in schedules:
            nxt, sched = self.led.get(name), self.tasks[name].schedule
            if nxt is None or sched is None:
                continue
            upto = nxt - dt.timedelta(seconds=min(1.0, sched.period(nxt) / 2))
            client.publish_confirmed("", self.stream, b"", commands.Basic.Properties(
                message_id=tick_id(name, upto), headers={CHECKPOINT: self.who}, delivery_mode=2))

    def _confirm(self, client: Client) -> None:
        """Declare the locks we lead by again, once per retry: a lock queue deleted under us (an operator, a script)
        would otherwise let a second worker declare it and lead too, both sending every tick for as long as both
        live. Our own exclusive queue declares again; one another connection took meanwhile answers 405."""
        for name in list(self.led):
            if not self._acquire(client, name):
                self.led.pop(name, None)
                log.warning("scheduler: the leader lock of %s was taken by another worker (deleted under us?); it "
                            "leads now", name, event="leader_lost", schedules=[name])

    def _acquire(self, client: Client, name: str, tries: int = 3) -> bool:
        """Declare our lock. The `locks` channel is shared with magne.gate, whose refused checks (404, its fill
        lock's 405) fail our call pipelined with theirs: a refusal that does not name our queue is asked again."""
        lock = lock_name(self.stream, name)
        try:
            client.call(names.QueueDeclare(queue=lock, durable=False, exclusive=True, auto_delete=False,
                                           arguments={"x-magne-leader": self.who}), commands.Queue.DeclareOk,
                        session=client.locks)
        except ChannelClosed as exc:
            if lock[:100] not in exc.text and tries > 1:  # reply texts are cut at 255 bytes: a prefix of the name
                return self._acquire(client, name, tries - 1)
            if exc.code != RESOURCE_LOCKED:
                log.warning("scheduler: cannot declare the leader lock of %s: %s", name, exc, event="lock_refused")
            return False
        return True

    def _release(self, schedules: list[str]) -> None:
        for name in schedules:
            self.led.pop(name, None)
            try:
                client = self.client()
                client.call(names.QueueDelete(queue=lock_name(self.stream, name)), commands.Queue.DeleteOk,
                            timeout=2.0, session=client.locks)
            except MagneError:
                pass  # the connection is gone: so is the lock

    def _take_over(self, client: Client, won: list[str]) -> None:
        """Declare what ticks go through, read the last recorded due time of each schedule, and start from there."""
        self._declare(client, won)
        now = dt.datetime.fromtimestamp(self.clock(), UTC)
        last = self._read_tail(client, won, now)
        for name in won:
            sched = self.tasks[name].schedule
            assert sched is not None
            prev = last.get(name)
            self.led[name] = sched.next_after(prev if prev is not None else now)
        self.won += len(won)
        log.info("scheduler: now leading %s (%s)", ", ".join(won), "; ".join(
            f"{n}: last tick {last[n].isoformat() if n in last else 'none recorded'}, next {self.led[n].isoformat()}"
            for n in won), event="leader_elected", schedules=won, who=self.who)

    def _declare(self, client: Client, won: list[str]) -> None:
        self.redeclare_at = time.monotonic() + REDECLARE
        client.call(names.ExchangeDeclare(exchange=self.stream, exchange_type="direct", durable=True),
                    commands.Exchange.DeclareOk)
        client.call(stream_declaration(self.stream), commands.Queue.DeclareOk)
        for name in won:
            t = self.tasks[name]
            for method, reply in topology.declarations(t.queue, t.queue_type or self.queue_type, t.max_priority):
                client.call(method, reply)
            for q in (t.queue, self.stream):
                client.call(names.QueueBind(queue=q, exchange=self.stream, routing_key=t.queue), commands.Queue.BindOk)

    def _read_tail(self, client: Client, won: list[str], now: dt.datetime) -> dict[str, dt.datetime]:
        """The last due time recorded in the stream for each schedule of `won`."""
        back = max(2 * s.period(now) + self.grace + 60.0 for n in won if (s := self.tasks[n].schedule))
        found = last_ticks(client, self.stream, now - dt.timedelta(seconds=min(back, MAX_LOOKBACK)))
        return {n: found[n][0] for n in won if n in found}

    def _fire(self, client: Client) -> None:
        now_ts = self.clock()
        now = dt.datetime.fromtimestamp(now_ts, UTC)
        for name, due in list(self.led.items()):
            task = self.tasks[name]
            sched: Schedule | None = task.schedule
            assert sched is not None
            if (now - due).total_seconds() > self.grace:  # older than the grace: skipped, not replayed
                first, due = due, sched.next_after(now - dt.timedelta(seconds=self.grace))
                self.led[name] = due
                self.skipped += 1
                log.warning("scheduler: skipped the ticks of %s due from %s to before %s, more than the grace of %gs "
                            "ago (no leader then); sending from %s", name, first.isoformat(),
                            (now - dt.timedelta(seconds=self.grace)).isoformat(), self.grace, due.isoformat(),
                            event="ticks_skipped", schedule=name)
            while due <= now and name in self.led:
                header, body = tick_message(task, due, self.who)
                client.publish_confirmed(self.stream, task.queue, body, header)  # raises: retried next turn
                self.sent += 1
                late = now_ts - due.timestamp()
                if late > 2 * self.retry:
                    log.info("scheduler: sent %s's tick due %s, %.1fs late", name, due.isoformat(), late,
                             event="tick_late", schedule=name, late=round(late, 3))
                due = self.led[name] = sched.next_after(due)


def last_ticks(client: Client, stream: str, since: dt.datetime, checkpoints: bool = True,
               leaders: dict[str, str] | None = None) -> dict[str, tuple[dt.datetime, str]]:
    """Each schedule's last recorded tick in `stream` from `since` on: (due time, who sent it); with `checkpoints`,
    a leader's checkpoint counts (the instant up to which it dealt with every due time); `leaders` gets the host/pid
    of each schedule's latest checkpoint (its leader, a minute ago at most, magne status). Writes a marker into
    the stream and reads up to it (the stream's end when we looked). The calling thread waits; the messages arrive
    on the Client's loop thread, where the callback only records and acks."""
    marker = f"magne.marker.{uuid.uuid4().hex}"
    client.publish_confirmed("", stream, b"", commands.Basic.Properties(message_id=marker))
    found: dict[str, tuple[dt.datetime, str]] = {}
    reached, seen = threading.Event(), [time.monotonic()]  # seen: when the last message came (a plain float store)

    def on_message(m: Delivered) -> None:
        seen[0] = time.monotonic()
        client.ack(m.tag, m.gen)
        try:
            props = codec.decode_properties(m.header)
        except Exception:
            return
        mid = props.message_id
        if mid == marker:
            reached.set()
        tick = parse_tick_id(mid) if isinstance(mid, str) else None
        if tick is not None and CHECKPOINT in (props.headers or {}):
            if leaders is not None:
                leaders[tick[0]] = str(props.headers[CHECKPOINT])  # type: ignore[index]
            tick = tick if checkpoints else None  # magne status shows ticks sent, not checkpoints
        if tick is not None and (tick[0] not in found or tick[1] > found[tick[0]][0]):
            who = (props.headers or {}).get("x-magne-scheduler", "?")
            found[tick[0]] = (tick[1], who if isinstance(who, str) else "?")

    tag = client.consume(stream, on_message, prefetch=1000,
                         arguments={"x-stream-offset": since.astimezone(UTC).replace(tzinfo=None)})
    try:  # a time-out only when nothing comes: 6 days of a 1 s schedule are 500k records, ~15 s to read (measured)
        while not reached.wait(min(1.0, TAIL_TIMEOUT)):
            if time.monotonic() - seen[0] >= TAIL_TIMEOUT:
                raise MagneError(f"the schedule stream {stream} sent nothing for {TAIL_TIMEOUT:g}s before its end")
    finally:
        client.cancel(tag)
    return found
