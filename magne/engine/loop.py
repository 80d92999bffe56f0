"""The one loop: the only code that waits on AMQP sockets.

A `Loop` runs on one thread (the worker's `magne-io`, or an application client's
`magne-publisher`) and drives its endpoints: each endpoint owns at most one Connection at a
time (the consuming connection, the worker's publishing link, a client's connection) and
answers `tick(now)` (its timers: the connection's deadlines and heartbeats, reconnects,
confirms overdue) and `failed(exc, now)` (its connection failed: it reconnects by its
Reconnector, or gives up). Each turn: run the timers when due (or when an endpoint is
`busy()`: something is in motion that they drive), wait in the selector for the sockets,
the Waker or the next timer, read and dispatch, run what other threads `submit()`ted, call
the owner's `turn(now)` (the worker drains finished tasks there; a client takes new
messages), write what is queued.

Timers are not run on every turn: at 50,000 messages a second the loop turns thousands of
times a second, and running them each time cost about 10 % of the raw figure (issue 10);
they run at least every TIMER_SLACK seconds.

Nothing here runs user code or takes a lock that user code can take; an exception from an
endpoint's connection is that endpoint's failure, never the loop's.
"""

from __future__ import annotations

import selectors
import time
from collections import deque
from collections.abc import Callable
from typing import Any, Protocol

from magne.amqp.errors import AMQPError
from magne.engine.connection import Connection
from magne.engine.transport import READ, WRITE
from magne.engine.waker import Waker

TIMER_SLACK = 0.1  # the longest the timers go unchecked after a turn that did something (I/O, a wake-up, a call)
# ... and after a turn that did nothing. Every state change reaches the loop as I/O or a wake-up, which brings the
# next check back within TIMER_SLACK, and the endpoints' timers say exactly when they are due: an idle loop need not
# look ten times a second. Measured 2026-12-06 on the latency workload (1,000 sleeping tasks, 34 s): an idle worker's
# two loops took 0.09 CPU-s per 30 s at TIMER_SLACK alone.
IDLE_SLACK = 1.0


class Endpoint(Protocol):
    """What a loop drives: one connection at a time, its timers, its failures. Loop thread only."""

    conn: Connection | None

    def tick(self, now: float) -> float | None:
        """Run what is due; return when to run again (None: only for I/O). May raise AMQPError (a failure)."""

    def failed(self, exc: AMQPError, now: float) -> None:
        """The endpoint's connection failed (I/O or timers): drop it, reconnect or give up."""

    def busy(self) -> bool:
        """Whether the timers must run on this turn (something in motion that they drive)."""


class Watcher:
    """The selector: the waker's fd, and one registration per endpoint kept in step with its socket.

    Registrations are keyed by the socket object, not its fd number: a reconnect closes one socket and the
    next often gets the same fd number, which epoll has already forgotten (modify() on it fails, an unchanged
    registration never fires). Every stale registration is removed before any new one is made, so a new
    socket that reuses the fd of another endpoint's old socket does not collide with it.
    """

    def __init__(self, wake_fd: int) -> None:
        self.sel = selectors.DefaultSelector()
        self.sel.register(wake_fd, READ, None)  # data None: the waker
        self._watched: dict[int, tuple[Any, int]] = {}  # id(endpoint) -> (socket, events) registered

    def sync(self, endpoints: list[Endpoint]) -> None:
        wanted: list[tuple[Endpoint, Any, int]] = []
        for ep in endpoints:
            conn = ep.conn
            sock = conn.sock if conn is not None else None
            events = conn.events() if conn is not None and sock is not None else 0
            wanted.append((ep, sock, events))
            old_sock, _old_events = self._watched.get(id(ep), (None, 0))
            if old_sock is not None and (old_sock is not sock or not events):
                try:
                    self.sel.unregister(old_sock)
                except (KeyError, ValueError, OSError):
                    pass
                self._watched[id(ep)] = (None, 0)
        for ep, sock, events in wanted:
            old_sock, old_events = self._watched.get(id(ep), (None, 0))
            if not events or (sock is old_sock and events == old_events):
                continue
            if old_sock is None:
                self.sel.register(sock, events, ep)
            else:
                self.sel.modify(sock, events, ep)
            self._watched[id(ep)] = (sock, events)

    def select(self, timeout: float) -> list[tuple[selectors.SelectorKey, int]]:
        return self.sel.select(timeout)

    def close(self) -> None:
        self.sel.close()


class Loop:
    """One loop, run by one thread (`run`); `submit` and `wake` from any thread."""

    def __init__(self, waker: Waker | None = None) -> None:
        self.waker = waker or Waker()
        self.endpoints: list[Endpoint] = []
        self._calls: deque[Callable[[], None]] = deque()
        # --metrics: observes how late the timers ran (seconds) because a turn of reading and settling took that long.
        self.on_lag: Callable[[float], None] | None = None

    # -- any thread --------------------------------------------------------------------------------------
    def submit(self, fn: Callable[[], None]) -> None:
        """Run `fn` on the loop's thread at its next turn (cold paths: a stop, a blocking tool call)."""
        self._calls.append(fn)
        self.waker.wake()

    def wake(self) -> None:
        self.waker.wake()

    # -- the loop's thread ---------------------------------------------------------------------------------
    def run(self, turn: Callable[[float], bool], timers: Callable[[float], float | None] | None = None) -> None:
        """Turn until `turn(now)` returns True. `timers(now)`: the owner's own timers, run with the endpoints'."""
        watcher = Watcher(self.waker.fileno())
        endpoints, calls, waker_fd = self.endpoints, self._calls, self.waker.fileno()
        busy = [ep.busy for ep in endpoints]  # bound once: asked on every turn
        timers_at = 0.0
        idle = False  # the last turn read nothing, was woken by nobody and ran no call
        try:
            while True:
                now = time.monotonic()
                due = now >= timers_at
                if not due:
                    for is_busy in busy:
                        if is_busy():
                            due = True
                            break
                if due:
                    if self.on_lag is not None and timers_at and now >= timers_at:
                        self.on_lag(now - timers_at)
                    wake = self._timers(now, timers)
                    cap = now + (IDLE_SLACK if idle else TIMER_SLACK)
                    timers_at = min(wake, cap) if wake is not None else cap
                watcher.sync(endpoints)
                events = watcher.select(max(timers_at, now) - now)
                now = time.monotonic()
                idle = not events and not calls
                if not idle and timers_at > now + TIMER_SLACK:
                    timers_at = now + TIMER_SLACK  # something happened: its timers are looked at within TIMER_SLACK
                for key, mask in events:
                    if key.data is None:
                        if key.fd == waker_fd:
                            self.waker.clear()
                    else:
                        self._on_io(key.data, mask, now)
                while calls:
                    calls.popleft()()
                if turn(now):
                    return
                for ep in endpoints:
                    conn = ep.conn
                    if conn is not None and conn.outbox:
                        try:
                            conn.flush(now)
                        except AMQPError as exc:
                            ep.failed(exc, now)
        finally:
            watcher.close()

    def _on_io(self, ep: Endpoint, mask: int, now: float) -> None:
        conn = ep.conn
        if conn is None:
            return
        try:
            if mask & WRITE:
                conn.on_writable(now)
            if mask & READ:
                conn.on_readable(now)
        except AMQPError as exc:
            ep.failed(exc, now)

    def _timers(self, now: float, own: Callable[[float], float | None] | None) -> float | None:
        wakes: list[float] = []
        for ep in self.endpoints:
            try:
                w = ep.tick(now)
            except AMQPError as exc:
                ep.failed(exc, now)
                w = now
            if w is not None:
                wakes.append(w)
        if own is not None:
            w = own(now)
            if w is not None:
                wakes.append(w)
        return min(wakes) if wakes else None
