"""magne.testing's stand-in for the results stream and for chords' gates: what a worker would publish after a
message (its result record, a pipeline's next step, a chord's callback) kept or sent in memory.

Called by magne.testing.Worker on the thread that reports a run (a pool thread, or the caller's in sync mode),
under no lock of its own: the worker's report path is serial per message, and the dicts' single operations are
atomic under the GIL.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from magne import chords, wire, workflow
from magne.delivery import Delivery, Outcome
from magne.workflow import asks, on_dead


class LocalFlow:
    def __init__(self) -> None:
        self.records: dict[str, dict[str, Any]] = {}  # message id -> its result record (magne.results), first wins
        self.gates: dict[str, tuple[bytes, bytes]] = {}  # chords' callbacks, held until their group is complete
        self.groups: dict[str, set[int]] = {}  # group id -> members that succeeded

    def holds(self, exchange: str | None, queue: str, body: bytes, header: bytes) -> bool:
        """A publish to a chord's gate is held here (magne.chords) instead of queued: True if it was one."""
        if exchange == "" and queue.startswith(f"{workflow.STREAM}.chord."):
            self.gates[queue] = (body, header)
            return True
        return False

    def settled(self, d: Delivery, publish: Callable[..., None]) -> None:
        """After a run was decided: keep its result record, publish its next step, fire a complete chord."""
        dead = d.outcome is Outcome.DEAD and asks(d.header)
        for nxt in (d.follow if d.outcome is Outcome.ACK else on_dead(d) if dead else None) or ():
            if nxt.routing_key == workflow.STREAM:  # a result record: what the stream would hold
                self.records.setdefault(nxt.message_id, wire.loads(nxt.body))
            else:  # a workflow's next step
                publish(nxt.routing_key, nxt.body, nxt.header)
        fired = chords.local_fire(d, self.records, self.groups, self.gates)
        if fired is not None:
            publish(*fired)
