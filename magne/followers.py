"""The results stream's readers: the shared follower of a process and the waiters it feeds (magne.results is the
public API on top).

One `Reader` per engine Client (the default publisher's: no connection of its own). A waiting call registers a
`Waiter` by message id on the client's loop thread and sleeps on its Signal; a `Follower` (a stream consumer
from an offset) hands each record to its waiters. Records seen are cached (bounded: CACHE records, CACHE_BYTES),
the first record of an id winning; a group's members are counted as their records pass (magne.chords).
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections import OrderedDict
from typing import Any

from magne import streams, wire, workflow
from magne.amqp import codec
from magne.amqp.errors import AMQPError, ChannelClosed
from magne.engine.client import Client
from magne.engine.session import Delivered
from magne.engine.waker import Signal
from magne.publisher import Publisher, default_publisher
from magne.workflow import sent_at_ms, stream_declaration

CACHE, CACHE_BYTES = 10_000, 64 << 20  # records kept per process, and their bytes at most
GROUPS = 10_000  # groups whose members' records are counted per process (magne.chords)
DROPPED = 100_000  # ids of groups whose count was dropped, remembered (a join of theirs recounts)
PREFETCH, ACK_EVERY = 1000, 200
SLICE = 0.2
READY_WAIT = 10.0
SLACK_MS = 60_000  # a follower starts this long before the message's send time (the worker's and our clocks)
# A waiter whose message was sent this soon after the newest record that left the cache was written may have had its
# record pass before it registered, and leave the cache since: it gets a catch-up follower of its own.
EVICTED_MARGIN_MS = 5_000


class Waiter:
    """One waiting call: the loop's thread fills `record` and signals (or completes an asyncio future)."""

    __slots__ = ("mid", "start", "signal", "record", "loop", "future", "rid")

    def __init__(self, mid: str, start: float, loop: asyncio.AbstractEventLoop | None = None,
                 future: asyncio.Future[dict[str, Any]] | None = None, rid: bool = False) -> None:
        self.mid, self.start, self.rid = mid, start, rid  # rid: `mid` is a record's own nonce (magne.chords)
        self.signal = Signal()
        self.record: dict[str, Any] | None = None
        self.loop, self.future = loop, future

    def set(self, record: dict[str, Any]) -> None:
        """The client's loop thread."""
        self.record = record
        self.signal.set()
        if self.loop is not None and self.future is not None:
            try:
                self.loop.call_soon_threadsafe(_complete, self.future, record)
            except RuntimeError:  # its event loop closed: nobody waits any more
                pass


def _complete(future: asyncio.Future[dict[str, Any]], record: dict[str, Any]) -> None:
    if not future.done():
        future.set_result(record)


class Follower:
    """A consumer of the stream from `start` (ms since the epoch; -inf: its first record)."""

    __slots__ = ("start", "tag", "users", "unacked", "lost")

    def __init__(self, start: float) -> None:
        self.start, self.tag, self.users, self.unacked = start, "", 0, 0
        self.lost = False  # its consumer is gone (refused after a reconnect, cancelled): no waiter picks it again


class Reader:
    """The results reader of one Client. Caller threads: wait/wait_async (taking `lock` only to pick or start a
    follower, never while waiting). The client's loop thread: _on_message, _register, _forget (waiters, cache)."""

    def __init__(self, client: Client) -> None:
        self.client = client
        self.waiters: dict[str, list[Waiter]] = {}
        self.cache: OrderedDict[str, dict[str, Any]] = OrderedDict()
        self.evicted_ms = 0.0  # the newest write time (ms, its "at") of a record evicted from the cache
        self.cached_bytes = 0
        self.groups: OrderedDict[str, set[int]] = OrderedDict()  # group id -> members with a success record so far
        self.dropped: OrderedDict[str, None] = OrderedDict()  # groups whose count was dropped (GROUPS), newest last
        self.dropped_many = False  # more than DROPPED were: any group's count short of its size may be incomplete
        self.rids: dict[str, Waiter] = {}  # a chord member's own record (its nonce) -> who waits to see it
        self.followers: list[Follower] = []
        self.lock = threading.Lock()
        self.declared = False
        self.stream = workflow.STREAM

    # -- caller threads ---------------------------------------------------------------------------------------
    def waiter(self, mid: str, loop: asyncio.AbstractEventLoop | None = None,
               future: asyncio.Future[dict[str, Any]] | None = None, rid: str | None = None,
               fresh: bool = False) -> tuple[Waiter, Follower]:
        """Register a waiter for `mid`'s record (or, with `rid`, for the record with that nonce, read from where `mid`
        was sent), making sure a follower will show it. Blocks for the broker's consume-ok when a follower must start
        (interruptibly: the client waits in slices). `fresh`: registered before its message was sent, so its record
        cannot have passed already: any follower that started early enough will do."""
        at = sent_at_ms(mid)
        w = Waiter(rid or mid, float("-inf") if at is None else at - SLACK_MS, loop, future, rid is not None)
        self.client.submit(lambda: self._register(w))  # before any follower starts: the cache covers what it passed
        if rid is None and w.mid in self.cache and w.signal.wait(SLICE):  # answered from the cache (a racy hint,
            w.signal.set()  # checked by the answer; a Signal's wait consumes it: set again for the caller's wait)
            return w, Follower(w.start)  # no follower started to read what is known already
        while not self.lock.acquire(timeout=SLICE):
            pass
        try:
            self._declare()
            self.followers = [f for f in self.followers if not f.lost or f.users > 0]
            found = self._reading_from(w.start)
            if found is not None and (fresh or w.start + SLACK_MS > self.evicted_ms + EVICTED_MARGIN_MS):
                f = found
            else:  # none reads from early enough, or what it read may have left the cache: a follower from there
                try:
                    f = self._start(w.start)
                except BaseException:
                    self.client.submit(lambda: self._forget(w))
                    raise
            f.users += 1
        finally:
            self.lock.release()
        return w, f

    def refollow(self, w: Waiter, f: Follower) -> Follower:
        """`w`'s follower `f` was lost: another from early enough (records read again count and cache once). Caller
        threads, in their waiting loop; `f` again if none can start now (no replica here yet): tried at the next slice."""
        while not self.lock.acquire(timeout=SLICE):
            pass
        try:
            try:
                g = self._reading_from(w.start) or self._start(w.start)
            except AMQPError:
                return f
            g.users, f.users = g.users + 1, f.users - 1
            if f.users <= 0 and f in self.followers:
                self.followers.remove(f)
            return g
        finally:
            self.lock.release()

    def abandon(self, f: Follower) -> None:
        """Give up a follower whose consumer is gone (refused after a reconnect, or cancelled by the broker: the loop's
        thread, its on_cancel): its waiters refollow. Any thread; never takes `lock` (a caller may hold it while it
        waits for the loop's thread)."""
        f.lost = True
        if f.tag:
            self.client.cancel(f.tag)

    def _reading_from(self, start: float) -> Follower | None:
        """The live follower that started latest but no later than `start` (ms), if any. Under `lock`."""
        usable = [f for f in self.followers if f.start <= start and not f.lost]
        return max(usable, key=lambda f: f.start) if usable else None

    def _start(self, start: float) -> Follower:
        """A new follower from `start` (ms; -inf: the stream's first record), consuming once this returns. Under `lock`."""
        f = Follower(start)
        f.tag = self._consume(f, streams.offset_at(start / 1000))
        self.followers.append(f)
        return f

    def _consume(self, f: Follower, offset: Any) -> str:
        """Start a follower's consumer. A stream declared a moment ago may not have its replica yet (406 "does not
        have a replica on the local node", RabbitMQ 3.10): tried again for up to READY_WAIT seconds."""
        deadline = time.monotonic() + READY_WAIT
        while True:
            try:
                return self.client.consume(self.stream, lambda m: self._on_message(f, m), PREFETCH,
                                           {"x-stream-offset": offset}, on_cancel=lambda: self.abandon(f))
            except ChannelClosed as exc:
                if exc.code != 406 or "replica" not in str(exc) or time.monotonic() > deadline:
                    raise
                time.sleep(0.1)

    def done(self, w: Waiter, f: Follower) -> None:
        """A waiting call ended (answered or timed out): forget its waiter; cancel a catch-up follower nobody uses."""
        self.client.submit(lambda: self._forget(w))
        while not self.lock.acquire(timeout=SLICE):
            pass
        try:
            f.users -= 1
            if f.users <= 0 and f in self.followers and (f.lost or f is not self.followers[0]):
                self.followers.remove(f)
                self.client.cancel(f.tag)
        finally:
            self.lock.release()

    def _declare(self) -> None:
        """The stream exists before anyone consumes it (a reader may come before the first result). Under `lock`."""
        if self.declared:
            return
        method, reply = stream_declaration()
        try:
            self.client.call(method, reply)
        except ChannelClosed as exc:  # it exists with other arguments (another retention): read it as it is
            if exc.code != 406:
                raise
        streams.mark(self.client, self.stream)  # `{}` before any follower attaches by time (streams.mark says why)
        self.declared = True

    def _advance(self, f: Follower, m: Delivered) -> None:
        """After a reconnect a follower is subscribed again from the record after `m` (every ACK_EVERY records), not
        from where it first started: it does not read hours of records again."""
        sub = self.client.session.subs.get(f.tag)
        try:
            offset = codec.decode_properties(m.header).headers["x-stream-offset"]
        except Exception:
            return
        if sub is not None and type(offset) is int:
            sub.arguments = {**sub.arguments, "x-stream-offset": offset + 1}

    def _count(self, group: str, rec: dict[str, Any]) -> None:
        """A group member's record: count its index once (only a success counts towards a chord). A waiter for this
        very record learns how many members had succeeded by then, in stream order (magne.chords)."""
        seen = self.groups.get(group)
        if seen is None:
            seen = self.groups[group] = set()
            if len(self.groups) > GROUPS:  # the group seen least recently goes; a join of its then recounts
                self.dropped[self.groups.popitem(last=False)[0]] = None
                if len(self.dropped) > DROPPED:
                    self.dropped.popitem(last=False)
                    self.dropped_many = True
        else:
            self.groups.move_to_end(group)
        if rec.get("ok") is True and type(rec.get("i")) is int and 0 <= rec["i"] < _size(group):
            seen.add(rec["i"])  # only an index the group has: a record with another cannot complete it early
        rid = rec.get("rid")
        w = self.rids.pop(rid, None) if isinstance(rid, str) else None
        if w is not None:
            w.set({**rec, "succeeded": len(seen)})

    def may_be_short(self, group: str) -> bool:
        """Whether `group`'s count may miss records (it was dropped once, and counted again from a later record).
        Any thread: a join asks after its own record was counted, and every drop before that record was made on the
        loop thread before it signalled the join."""
        return self.dropped_many or group in self.dropped

    def recount(self, group: str, rid: str, start: float, timeout: float) -> int:
        """How many members of `group` had succeeded by the record with nonce `rid`, counted by a follower of its own
        from `start` (ms; -inf: the stream's first record). A chord member's join (pool thread) calls it when the
        shared count fell short and may be incomplete (may_be_short: a busy process dropped its count, or a
        catch-up follower's old records pushed it out): without it the member completing the set would see too few and
        the callback would never run. TimeoutError if the record does not show within `timeout` seconds."""
        seen: set[int] = set()
        w = Waiter(rid, start, rid=True)
        f = Follower(start)

        def on_message(m: Delivered) -> None:  # the client's loop thread
            f.unacked += 1
            if f.unacked >= ACK_EVERY:
                f.unacked = 0
                self.client.ack(m.tag, m.gen, multiple=True)
            try:
                rec = wire.loads(m.body)
            except (ValueError, RecursionError):
                return
            if isinstance(rec, dict) and rec.get("group") == group:
                if rec.get("ok") is True and type(rec.get("i")) is int and 0 <= rec["i"] < _size(group):
                    seen.add(rec["i"])
                if rec.get("rid") == rid and w.record is None:
                    w.set({"succeeded": len(seen)})

        tag = self.client.consume(self.stream, on_message, PREFETCH, {"x-stream-offset": streams.offset_at(start / 1000)})
        try:
            deadline = time.monotonic() + timeout
            while not w.signal.wait(SLICE):
                if time.monotonic() > deadline:
                    raise TimeoutError(f"its own record did not show in a recount within {timeout:g}s")
        finally:
            self.client.cancel(tag)
        assert w.record is not None
        return int(w.record["succeeded"])

    # -- the client's loop thread ------------------------------------------------------------------------------
    def _register(self, w: Waiter) -> None:
        if w.rid:
            self.rids[w.mid] = w
            return
        rec = self.cache.get(w.mid)
        if rec is not None:
            w.set(rec)
        else:
            self.waiters.setdefault(w.mid, []).append(w)

    def _forget(self, w: Waiter) -> None:
        if w.rid:
            self.rids.pop(w.mid, None)
            return
        ws = self.waiters.get(w.mid)
        if ws is not None and w in ws:
            ws.remove(w)
            if not ws:
                del self.waiters[w.mid]

    def _on_message(self, f: Follower, m: Delivered) -> None:
        f.unacked += 1
        if f.unacked >= ACK_EVERY:  # a stream consumer's credit: one multiple ack per ACK_EVERY records
            f.unacked = 0
            self.client.ack(m.tag, m.gen, multiple=True)
            self._advance(f, m)
        try:
            rec = wire.loads(m.body)
        except (ValueError, RecursionError):
            return  # not a record of ours
        if not isinstance(rec, dict) or type(rec.get("ok")) is not bool:
            return  # not a record (a message someone else put in the stream): it answers nobody
        group = rec.get("group")
        if isinstance(group, str):
            self._count(group, rec)
        mid = rec.get("id")
        if not isinstance(mid, str) or mid in self.cache:
            return  # the first record of an id wins
        self.cache[mid] = rec
        rec["_size"] = len(m.body)
        self.cached_bytes += len(m.body)
        while len(self.cache) > CACHE or self.cached_bytes > CACHE_BYTES:
            _mid, old = self.cache.popitem(last=False)
            self.cached_bytes -= old.pop("_size", 0)
            at = old.get("at")
            if isinstance(at, int | float):
                self.evicted_ms = max(self.evicted_ms, at * 1000)
        for w in self.waiters.pop(mid, ()):
            w.set(rec)


def _size(group: str) -> int:
    """A group's size, as its id names it (0 for an id magne does not make: none of its records counts)."""
    m = workflow.CHORD_GROUP.fullmatch(group)
    return int(m.group(1)) if m is not None else 0


_readers: dict[int, Reader] = {}
_readers_lock = threading.Lock()


def reader(pub: Publisher | None = None) -> Reader:
    """The reader of `pub`'s client (the default publisher's): one per client, made on first use; those of clients
    that ended are dropped here."""
    client = (pub or default_publisher())._running()
    with _readers_lock:
        r = _readers.get(id(client))
        if r is None or r.client is not client:
            for key in [k for k, v in _readers.items() if not v.client.alive]:
                del _readers[key]
            r = _readers[id(client)] = Reader(client)
        return r
