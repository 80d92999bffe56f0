"""The I/O thread's selector: the wake-up fd, and one registration per connection kept in step with it.

Registrations are keyed by the socket object, not its fd number: a reconnect closes one
socket and the next often gets the same fd number, which epoll has already forgotten
(modify() on it fails, an unchanged registration never fires). Every stale registration
is removed before any new one is made, so a new socket that reuses the fd of the other
connection's old socket does not collide with it. Used by the I/O thread only.
"""

from __future__ import annotations

import selectors
from typing import Any

from magne.engine.connection import READ, Connection


class Watcher:
    def __init__(self, wake_fd: int) -> None:
        self.sel = selectors.DefaultSelector()
        self.sel.register(wake_fd, READ, None)  # data None: the wake-up
        self._watched: dict[str, tuple[Any, int]] = {}  # name -> (socket, events) registered

    def sync(self, conns: dict[str, Connection | None]) -> None:
        """Register, modify or drop each named connection's socket for what it waits for now."""
        wanted: dict[str, tuple[Any, int]] = {}
        for who, conn in conns.items():
            sock = conn.sock if conn is not None else None
            wanted[who] = (sock, conn.events() if conn is not None and sock is not None else 0)
            old_sock, _old_events = self._watched.get(who, (None, 0))
            if old_sock is not None and (old_sock is not sock or not wanted[who][1]):
                try:
                    self.sel.unregister(old_sock)
                except (KeyError, ValueError, OSError):
                    pass
                self._watched[who] = (None, 0)
        for who, (sock, events) in wanted.items():
            old_sock, old_events = self._watched.get(who, (None, 0))
            if not events or (sock is old_sock and events == old_events):
                continue
            if old_sock is None:
                self.sel.register(sock, events, who)
            else:
                self.sel.modify(sock, events, who)
            self._watched[who] = (sock, events)

    def select(self, timeout: float) -> list[tuple[selectors.SelectorKey, int]]:
        return self.sel.select(timeout)

    def close(self) -> None:
        self.sel.close()
