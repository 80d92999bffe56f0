"""The one reconnect policy: which node to try next, and how long to wait first.

Every connection magne keeps (the worker's consuming connection, its publishing link, an
application's client) reconnects through a `Reconnector`: it moves to the next node of the
cluster at once while untried nodes remain (a node shutting down, 320, is left at once too),
and backs off (magne.backoff, exponential with full jitter) only once a whole round of nodes
failed in a row. A connection that lived STABLE_AFTER seconds resets the backoff; one that
the broker keeps closing right after it opened gets a short first pause, then backs off.
Owned by the thread of the loop that drives the connection.
"""

from __future__ import annotations

from magne.amqp.errors import AMQPError, ConnectionClosed
from magne.amqp.url import Nodes
from magne.backoff import Backoff

STABLE_AFTER = 10.0  # a connection that lived this long resets the backoff
FIRST_PAUSE = 0.2  # after losing an open connection, the first retry on the same round waits this long


class Reconnector:
    """`moves`: whether a failure moves `nodes` on to the next node. A connection that follows another one's node (a
    worker's publishing link follows its consuming connection, whose Reconnector moves the shared Nodes) does not:
    it backs off and tries again wherever the leader is, so two failures of one node never move it twice."""

    __slots__ = ("nodes", "backoff", "opened_at", "moves")

    def __init__(self, nodes: Nodes, backoff: Backoff | None = None, moves: bool = True) -> None:
        self.nodes = nodes
        self.backoff = backoff or Backoff()
        self.opened_at = 0.0
        self.moves = moves

    def opened(self, now: float) -> None:
        """The connection is up (and usable)."""
        self.opened_at = now
        if self.moves:
            self.nodes.succeeded()

    def failed(self, exc: AMQPError, now: float, was_open: bool) -> tuple[float, bool]:
        """The connection failed (while open, or while connecting): move on. Returns the delay before the next
        attempt (0: another node is there, go now) and whether every node has now failed in a row."""
        round_failed = self.nodes.failed() if self.moves else True
        if was_open and self.opened_at and now - self.opened_at > STABLE_AFTER:
            self.backoff.reset()
        self.opened_at = 0.0
        forced = isinstance(exc, ConnectionClosed) and exc.code == 320
        if forced or not round_failed:
            return 0.0, round_failed
        if was_open and not self.backoff.attempt:
            self.backoff.attempt = 1  # a broker that keeps closing us at once is then backed off from
            return FIRST_PAUSE, round_failed
        return self.backoff.next(), round_failed
