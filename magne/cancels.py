"""Cancelling messages: `magne.cancel(message_id)`, and how a worker keeps every cancel it must honour.

A cancel is a record in a RabbitMQ stream (`magne.cancels`, kept for MAGNE_CANCEL_RETENTION seconds, 24 h by
default; magne.streams). Every worker process reads the stream from the start of that window when it starts, before
its pool runs anything, and then follows it. So a cancel reaches the workers that are up (within a round trip), the
ones that restart, and the ones started after it, and no worker ever needs to be up when it is made (the gap of
celery's in-memory revokes). The worker keeps the ids in a `CancelSet` (a dict: one lookup), bounded by the
retention window, never by throughput.

Where it is checked (magne.runner.Runner.resolve): where any message is about to run, whatever way it came: straight
from its queue, prefetched before the cancel arrived, back from a delay queue (a delayed send or a retry). A message
found cancelled there is acked and counted as cancelled, never run, retried nor dead-lettered. A message already
running is interrupted by the watchdog (magne.pool, magne.asyncpool) with magne.Cancelled.

The catch-up at start: after subscribing, a worker appends a marker record of its own and waits until it reads it
back; everything appended before the marker was read by then, so no cancel made before the worker started can be
missed (a stream has no "end" to wait for otherwise).
"""

from __future__ import annotations

import os
import struct
import threading
import time
import uuid
from collections import deque
from collections.abc import Iterable
from typing import Any

import orjson
from pamqp import commands

from magne import logs, streams
from magne.engine.client import Client
from magne.publisher import default_publisher

log = logs.Log("magne.cancels")

DEFAULT_STREAM = "magne.cancels"
MAX_IDS = 10_000  # ids in one cancel record (a bigger cancel is split into several records)
MAX_KEPT = 1_000_000  # ids a worker keeps at most (about 100 MB); past it the oldest cancels are forgotten first


def stream_name() -> str:
    """The cancels stream: MAGNE_CANCEL_STREAM, else magne.cancels (tests use their own)."""
    return os.environ.get("MAGNE_CANCEL_STREAM") or DEFAULT_STREAM


def retention() -> float:
    return streams.seconds_from_env("MAGNE_CANCEL_RETENTION", streams.DAY)


# -- reading a message's id from its content header, on the hot path -----------------------------------------------
_FIELDS = struct.Struct(">HHQH")  # class, weight, body size, property flags (the header payload's start)
_LONG = struct.Struct(">I")
_OWN_FLAGS = b"\x90\x80"  # content-type, delivery-mode, message-id: what magne's senders write
_OWN_TYPE = b"\x10application/json"


def message_id_of(header: bytes) -> str | None:
    """The message_id property of a content header payload, read without decoding the other properties (a few
    hundred ns; decoding them all costs several us). None if it has none or the header is malformed. Any thread."""
    if header[12:14] == _OWN_FLAGS and header[14:31] == _OWN_TYPE:  # magne's own header (outgoing.json_header)
        n = header[32] if len(header) > 32 else 0
        return header[33:33 + n].decode("utf-8", "replace") if n else None
    try:
        flags = _FIELDS.unpack_from(header)[3]
        if not flags & 0x0080:  # message-id
            return None
        pos = 14
        for bit in (0x8000, 0x4000):  # content-type, content-encoding: short strings
            if flags & bit:
                pos += 1 + header[pos]
        if flags & 0x2000:  # headers: a table, long-prefixed
            pos += 4 + _LONG.unpack_from(header, pos)[0]
        pos += (1 if flags & 0x1000 else 0) + (1 if flags & 0x0800 else 0)  # delivery-mode, priority: octets
        for bit in (0x0400, 0x0200, 0x0100):  # correlation-id, reply-to, expiration: short strings
            if flags & bit:
                pos += 1 + header[pos]
        n = header[pos]
        return header[pos + 1:pos + 1 + n].decode("utf-8", "replace")
    except (IndexError, struct.error):
        return None


def is_cancelled(d: Any, ids: Any) -> bool:
    """Whether a delivery (magne.delivery.Delivery) is one of `ids` (a set or dict of message ids): by its message_id
    property, or, for a foreign message (dramatiq keeps its id in the body, celery in a header: magne.formats sets
    d.meta once it resolved the message), by that id too. Any thread; cold unless a cancel is known."""
    if message_id_of(d.header) in ids:
        return True
    meta_id = getattr(d.meta, "message_id", None)
    return meta_id is not None and meta_id in ids


def covered(mid: str | None, ids: Any) -> bool:
    """Whether message id `mid` is cancelled by `ids`: itself, or as a group's member or a chord's callback (magne.steps
    names them `<group>.<i>` and `<group>.callback`, a group id ending `.g<n>`) by a cancel of its group or of its
    chord (`<group>.callback`): cancelling a group or a chord cancels what of it has not run yet. Any run thread, only
    when a cancel is known (two more dict lookups for an id of that form)."""
    if mid is None:
        return False
    if mid in ids:
        return True
    group, _, _last = mid.rpartition(".")
    if not group or not group.rpartition(".")[2].startswith("g"):
        return False
    return group in ids or f"{group}.callback" in ids


def id_of(d: Any) -> str | None:
    """The id a cancel names a delivery by: its message_id property, else a foreign message's own id. Any thread."""
    return message_id_of(d.header) or getattr(d.meta, "message_id", None)


class CancelSet:
    """The ids cancelled within the retention window, with the time each was cancelled.

    Written only by the client's loop thread (`add`, from the stream); read by run threads (`in`, one dict lookup under
    the GIL) and drained by the worker's main thread (`fresh`: ids to look for among running tasks). Pruned of ids
    older than the retention as it grows: its size follows the cancels of one window, never throughput."""

    __slots__ = ("ids", "fresh", "keep", "_prune_at")

    def __init__(self, keep: float = streams.DAY) -> None:
        self.ids: dict[str, float] = {}
        self.fresh: deque[str] = deque(maxlen=MAX_IDS)
        self.keep = keep
        self._prune_at = 1024

    def __contains__(self, mid: object) -> bool:
        return mid in self.ids

    def __len__(self) -> int:
        return len(self.ids)

    def add(self, ids: Iterable[str], at: float, fresh: bool = True) -> None:
        """`fresh`: ids new to the set are also handed to the watchdog to look for among running tasks (not for the
        catch-up at start: nothing runs before it ends, and a window of old ids would crowd out the next cancels)."""
        ids_ = self.ids
        for mid in ids:
            if fresh and mid not in ids_:
                self.fresh.append(mid)
            ids_[mid] = at
        if len(ids_) >= self._prune_at:
            horizon = time.time() - self.keep
            kept = {k: v for k, v in ids_.items() if v >= horizon}
            if len(kept) > MAX_KEPT:  # a flood of cancels: memory stays bounded, the oldest go first
                log.warning("more than %d cancelled ids within the retention window; forgetting the oldest",
                            MAX_KEPT, event="cancels_overflow")
                # Down to three quarters, so that the next sort (on the client's loop thread) is a quarter of the
                # bound away, not one record away.
                kept = dict(sorted(kept.items(), key=lambda kv: kv[1])[-(MAX_KEPT * 3 // 4):])
            self.ids = kept  # one rebinding: readers see the old dict or the new one
            # Never past MAX_KEPT (doubling alone let a flood grow the set to twice the bound before the next prune).
            self._prune_at = min(max(1024, 2 * len(kept)), max(1024, MAX_KEPT))


def check_ids(ids: Iterable[Any]) -> list[str]:
    """The ids as given, validated (a message id is a non-empty string of valid UTF-8, at most 255 bytes); ValueError."""
    out = []
    for mid in ids:
        if not isinstance(mid, str) or not mid or len(mid.encode("utf-8", "surrogatepass")) > 255 or not _utf8(mid):
            raise ValueError(f"not a message id: {logs.clean(repr(mid), 80)} (a non-empty string of valid UTF-8, at "
                             "most 255 bytes)")
        out.append(mid)
    if not out:
        raise ValueError("no message id given")
    return list(dict.fromkeys(out))


def _utf8(mid: str) -> bool:
    """Whether `mid` is valid UTF-8 text: a lone surrogate (bytes that are not UTF-8 in argv, decoded by Python with
    surrogateescape) is no message id a broker can carry, and the record's encoder would refuse it with a TypeError."""
    try:
        mid.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _properties() -> commands.Basic.Properties:
    return commands.Basic.Properties(content_type="application/json", delivery_mode=2, message_id=str(uuid.uuid4()))


def cancel(*message_ids: str, publisher: Any = None) -> list[str]:
    """Cancel messages by id: one that has not started never runs (in its queue, prefetched, delayed or waiting for
    a retry); one running is interrupted with magne.Cancelled (its message is not retried). Lasts for the retention
    window (MAGNE_CANCEL_RETENTION, 24 h), across worker restarts. Returns the ids recorded, once the broker confirmed
    the record. Calling thread; on the given publisher's connection (the default publisher's otherwise).
    `magne.cancel` is magne.outcomes.cancel: this, then a lookup of whether each message already finished."""
    ids = check_ids(message_ids)
    pub = publisher if publisher is not None else default_publisher()
    client: Client = pub._running()
    name = stream_name()
    streams.declare(client, name, retention())
    for i in range(0, len(ids), MAX_IDS):
        body = orjson.dumps({"cancel": ids[i:i + MAX_IDS], "at": time.time()})
        client.publish_confirmed("", name, body, _properties())
    return ids


class Follower:
    """A worker process's reader of the cancels stream, on its publisher's Client. The worker's main thread calls
    `start` (which waits for the catch-up); `_on_body` runs on the client's loop thread."""

    def __init__(self, client: Client, cancels: CancelSet, name: str | None = None) -> None:
        self.client = client
        self.cancels = cancels
        self.name = name or stream_name()
        self.marker = f"{os.getpid()}.{uuid.uuid4().hex}"
        self.caught_up = threading.Event()
        self.gave_up = False  # start() stopped waiting for the catch-up: the pool runs, every cancel is fresh
        self.tag = ""
        self.lost = False  # the broker cancelled our reader (the stream was deleted): Control.check calls resume
        self.retry_at = 0.0  # time.monotonic() before which Control.check does not call resume again

    def start(self, timeout: float = 15.0) -> bool:
        """Declare the stream, read it from the retention window's start, and wait until every record appended
        before now was read (the marker came back). False (logged) if that took longer than `timeout`: the worker
        then runs anyway, and honours the cancels as they arrive. Main thread; raises what the broker refused."""
        keep = self.cancels.keep
        streams.declare(self.client, self.name, keep)
        # The marker goes in first: read from the retention window's start, it still comes back after every record
        # appended before it, and a stream that held nothing yet is not read from its end (streams.mark says why).
        self.client.publish_confirmed("", self.name, orjson.dumps({"marker": self.marker}), _properties())
        self.tag = streams.follow(self.client, self.name, time.time() - keep, self._on_body, on_cancel=self._on_lost)
        if self.caught_up.wait(timeout):
            return True
        self.gave_up = True
        log.warning("the cancels stream %s was not read to its end within %gs; starting anyway (cancels made before "
                    "now may be honoured late)", self.name, timeout, event="cancels_late")
        return False

    def stop(self) -> None:
        if self.tag:
            self.client.cancel(self.tag)

    def _on_lost(self) -> None:
        """Client loop thread: the broker ended our reader (the stream deleted, by an operator re-creating it with
        other settings, or refused after a reconnect). Without a new one this process would honour no cancel again."""
        self.lost = True

    def resume(self) -> None:
        """A magne-control thread (Control.check, once lost): read the stream again from the retention window's start
        (a re-created stream has new offsets; records read twice change nothing) and follow it. A refusal is logged
        and leaves it lost (Control.check tries again later)."""
        self.lost = False
        try:
            streams.declare(self.client, self.name, self.cancels.keep)
            self.tag = streams.follow(self.client, self.name, time.time() - self.cancels.keep, self._on_body,
                                      on_cancel=self._on_lost)
        except Exception as exc:
            self.lost = True
            log.warning("cannot follow the cancels stream %s again (%s: %s); cancels are not honoured until it is",
                        self.name, type(exc).__name__, logs.clean(str(exc), 200), event="cancels_unavailable")
            return
        log.info("following the cancels stream %s again", self.name, event="cancels_resumed")

    def _on_body(self, body: bytes) -> None:
        """Client loop thread: one record. A record that is not ours is skipped (streams.follow logs it)."""
        rec = orjson.loads(body)
        if not isinstance(rec, dict):
            raise ValueError("not a record")
        ids = rec.get("cancel")
        if isinstance(ids, list):
            at = rec.get("at")
            now = time.time()
            at = float(at) if isinstance(at, int | float) and not isinstance(at, bool) else now
            at = min(at, now)  # a record dated in the future (forged, or a skewed clock) is not kept past its window
            if at >= now - self.cancels.keep:
                good = [m for m in ids[:MAX_IDS] if isinstance(m, str) and 0 < len(m) <= 255]
                self.cancels.add(good, at, fresh=self.caught_up.is_set() or self.gave_up)
                if self.caught_up.is_set() and good:
                    log.info("cancel received for %d message(s): %s", len(good),
                             ", ".join(logs.clean(m, 80) for m in good[:5]) + (" ..." if len(good) > 5 else ""),
                             event="cancel_received")
        elif rec.get("marker") == self.marker:
            self.caught_up.set()
