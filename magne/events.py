"""Task events: one record per finished run, published by workers to the stream `magne.events`, batched.

What a record holds (a stream message holds a batch: `{"host", "pid", "fields": [...], "rows": [[...], ...]}`, one
row per record, its columns named by `fields`, null for what a record lacks; `parse` gives one dict per record):

    t         wall-clock time the outcome was decided (seconds since the epoch)
    event     succeeded | retried | dead-lettered | cancelled | requeued | returned (given back unstarted)
    task, queue, id (the message id); host and pid once per batch
    started   wall-clock time its run started (absent if it never started: a bad message, a cancel before the start)
    duration  seconds the task ran
    reason    why it failed (retried, dead-lettered: "task raised", "time limit", "bad message", ...)
    error     {"type", "message"} of the exception, for a failure

Reading: `magne dashboard` replays the stream from its retention start, so history survives its restart; anything
that reads a RabbitMQ stream can (the records are plain JSON).

Cost on the hot path (magne/worker.py wires `wrap` around the I/O thread's `report`): the reporting thread builds a
tuple of fields it already has and appends it to a deque, nothing else: no JSON, no lock, no I/O. The `magne-events`
thread wakes every FLUSH_EVERY seconds, turns what waits into JSON arrays of up to BATCH records and hands them
to the publisher Client (unconfirmed: events are telemetry; losing a batch to a broken connection loses no task).
The buffer is bounded (MAX_BUFFER): while the broker cannot take events the oldest are dropped, so a worker's memory
never grows with time. bench: docs/control.md has the figures with events on and off.
"""

from __future__ import annotations

import os
import socket
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import Any

import orjson
from pamqp import commands

from magne import logs, streams
from magne.amqp import codec
from magne.cancels import message_id_of
from magne.delivery import Delivery, Outcome
from magne.engine.client import Client
from magne.engine.message import Outgoing

log = logs.Log("magne.events")

DEFAULT_STREAM = "magne.events"
# Seconds between batches. Each batch wakes two threads (this one, the client's) and is a stream write on the broker
# whatever it holds, so at a low rate the interval is the cost: 0.5 s rather than 0.1 s took the latency workload
# (1,000 sleeping tasks in 33 s) from 1.23 to 1.11 CPU-s against 0.97 with events off (medians of 3 in one session, 2026-12-06;
# `python -m bench --workloads latency --peers magne magne-events-off`). A record is in the stream within about
# FLUSH_EVERY of its outcome.
FLUSH_EVERY = 0.5
BATCH = 1000  # records in one stream message at most
MAX_BUFFER = 100_000  # records held while the broker cannot take them; older ones are dropped
ROOM = 32  # batches handed to the publisher client while it has fewer messages than this waiting or unconfirmed
MAX_BYTES = 2_000_000_000  # the stream's x-max-length-bytes, beside its age: disk stays bounded at any rate

NAMES = {Outcome.ACK: "succeeded", Outcome.RETRY: "retried", Outcome.DEAD: "dead-lettered",
         Outcome.REQUEUE: "requeued", Outcome.GIVE_BACK: "returned"}
NAMES_BY_OUTCOME = [NAMES[o] for o in sorted(Outcome)]  # indexed by the outcome's value: no enum hashing per event
FIELDS = ("t", "event", "task", "queue", "id", "started", "duration", "reason", "error")  # a row's columns

Entry = tuple[bytes, str, str, str, str, Any, float, float, Any]


def stream_name() -> str:
    """The events stream: MAGNE_EVENTS_STREAM, else magne.events (tests use their own)."""
    return os.environ.get("MAGNE_EVENTS_STREAM") or DEFAULT_STREAM


def retention() -> float:
    return streams.seconds_from_env("MAGNE_EVENTS_RETENTION", streams.DAY)


def declare(client: Client, name: str | None = None) -> str:
    name = name or stream_name()
    streams.declare(client, name, retention(), MAX_BYTES)
    return name


class Events:
    """A worker process's event buffer and its flusher. `wrap` is called by the worker's main thread at start; the
    function it returns runs on every reporting thread (pool threads, the event loop's, the watchdog); `run` is the
    `magne-events` thread; `stop` the main thread at the end (a last flush)."""

    def __init__(self, client: Callable[[], Client]) -> None:
        self.client = client
        self.buf: deque[Entry] = deque(maxlen=MAX_BUFFER)
        self.host, self.pid = socket.gethostname(), os.getpid()
        self.name = stream_name()
        self.published = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._client: Client | None = None

    def wrap(self, report: Callable[[Delivery], None]) -> Callable[[Delivery], None]:
        """`report` with an event recorded first. The hot path: one tuple of what the delivery holds, one append.

        The tuple holds the outcome's name, not the Outcome member: an enum member is an object the garbage collector
        tracks, and a tuple holding one stays tracked, so the 25,000 records of half a second at 50,000 tasks/s were
        promoted and walked by every older collection. The record of a success of a magne message holds only strings,
        bytes, floats and None (a failure's holds its error, a foreign message's its fields), and the collector drops
        it from its lists at its first pass: GC went from 83-99 ms to 53-56 ms per 200,000 raw messages
        (7 ms with events off), and raw at prefetch 256 from 48,850 to 55,443 messages/s once started (medians of 8
        alternating rounds, `python -m bench.cpu_per_message 100000 256 --base DIR`, 2026-12-06). Writing each row's
        JSON here instead (no tracked object at all) cost more than it saved: it moves the events thread's work onto
        the pool threads, which share the GIL with the I/O thread (51,430 against 56,244/s)."""
        append, now, names = self.buf.append, time.monotonic, NAMES_BY_OUTCOME

        def reporting(d: Delivery) -> None:
            try:
                append((d.header, d.task, d.queue, names[d.outcome], d.reason, d.error, d.started, now(), d.meta))
            except (IndexError, TypeError):  # an outcome that is no Outcome (none is made): it loses its record only
                pass
            report(d)

        return reporting

    def start(self) -> None:
        self._thread = threading.Thread(target=self.run, name="magne-events", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 2.0) -> None:
        """Main thread, after the pool stopped: flush what is left and let the client write it, briefly (the process
        may exit next, and the client's thread with it)."""
        deadline = time.monotonic() + timeout
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
        client = self._client  # the one the thread published on, if any (never start a client to stop)
        while client is not None and client.alive and not client.has_room(1) and time.monotonic() < deadline:
            time.sleep(0.01)

    def run(self) -> None:
        """magne-events thread: declare the stream, then flush every FLUSH_EVERY seconds until stopped."""
        ready = False
        while True:
            # The stream is declared at once, not a FLUSH_EVERY later: a cancel lookup reads it from a worker's start
            stopping = self._stop.wait(FLUSH_EVERY) if ready else self._stop.is_set()
            if ready and not self.buf and not stopping:
                continue  # nothing to write: an idle worker's events thread costs its timed wait and no more
            try:
                client = self._client = self.client()
                if not ready:
                    declare(client, self.name)
                    ready = True
                # Everything that waits, in batches of BATCH, but only while the client has room: handed over
                # regardless, a blocked or unreachable broker moved every event into the client's queue (bounded by
                # the 30 s deadline only, not MAX_BUFFER) ahead of the tasks' own sends. (It used to stop at the
                # last partial batch: that one waited a tick, and at a stop it was dropped.)
                while self.buf and client.has_room(ROOM):
                    self._flush(client)
            except Exception as exc:
                log.warning("task events could not be published (%s: %s); %d waiting", type(exc).__name__,
                            logs.clean(str(exc), 200), len(self.buf), event="events_unavailable")
                if not stopping:
                    self._stop.wait(5.0)
            if stopping:
                return

    def _flush(self, client: Client) -> None:
        """magne-events thread: one stream message of up to BATCH records (host and pid once, for the batch)."""
        buf, rows = self.buf, []
        shift = time.time() - time.monotonic()  # monotonic -> wall clock
        popleft, append, mid = buf.popleft, rows.append, message_id_of
        for _ in range(min(len(buf), BATCH)):
            header, task, queue, name, reason, error, started, at, meta = popleft()
            # A foreign message (dramatiq, celery) has its id in d.meta (magne.formats) when it has no message_id
            mid_ = mid(header) or (meta.message_id if meta is not None else None)
            if not reason:  # the common case: a success
                append((at + shift, name, task, queue, mid_, started + shift if started else None,
                        at - started if started else None))
                continue
            event = "cancelled" if reason == "cancelled" else name
            err = {"type": error.get("type"), "message": logs.clean(error.get("message", ""), 300)} if error else None
            append((at + shift, event, task, queue, mid_, started + shift if started else None,
                    at - started if started else None, None if event == "cancelled" else reason, err))
        body = orjson.dumps({"host": self.host, "pid": self.pid, "fields": FIELDS, "rows": rows})
        props = commands.Basic.Properties(content_type="application/json", delivery_mode=2)
        client.publish(Outgoing("", self.name, codec.header_payload(props, len(body)), body, None,
                                deadline=time.monotonic() + 30.0))
        self.published += len(rows)


def parse(body: bytes) -> list[dict[str, Any]]:
    """The records of one stream message (`{"host", "pid", "fields", "rows"}`) as one dict each, with the batch's
    host and pid, and no key for a column that is null (a row may be shorter than `fields`); ValueError for anything
    else."""
    batch = orjson.loads(body)
    rows = batch.get("rows") if isinstance(batch, dict) else None
    fields = batch.get("fields") if isinstance(batch, dict) else None
    if not isinstance(rows, list) or not isinstance(fields, list) or not all(isinstance(f, str) for f in fields):
        raise ValueError("not a batch of events")
    host, pid = batch.get("host"), batch.get("pid")
    out = []
    for row in rows:
        if isinstance(row, list):
            rec = {k: v for k, v in zip(fields, row, strict=False) if v is not None}
            rec["host"], rec["pid"] = host, pid
            out.append(rec)
    return out


def follow(client: Client, on_records: Callable[[list[dict[str, Any]]], None], since: float,
           name: str | None = None) -> str:
    """Read the events stream from wall-clock time `since` and keep following it: `on_records(records)` per batch, on
    the client's loop thread (must not block). Returns the consumer tag. Any thread but the client's loop thread."""
    name = declare(client, name)
    return streams.follow(client, name, since, lambda body: on_records(parse(body)))
