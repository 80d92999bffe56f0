"""Counters written only by the I/O thread; read (racily, for reports) by the main thread."""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass
class Stats:
    delivered: int = 0
    acked: int = 0
    retried: int = 0
    dead: int = 0
    requeued: int = 0
    redelivered: int = 0
    stale: int = 0  # outcomes of deliveries from a channel that is gone (their messages come back redelivered)
    reconnects: int = 0
    cancels: int = 0  # basic.cancel from the broker (queue deleted, node down)
    copy_failures: int = 0  # copies the broker refused or returned, or lost with their link

    def as_dict(self) -> dict[str, int]:
        return dataclasses.asdict(self)

    def line(self) -> str:
        return (f"delivered={self.delivered} acked={self.acked} retried={self.retried} dead-lettered={self.dead} "
                f"requeued={self.requeued} redelivered={self.redelivered} stale={self.stale} "
                f"reconnects={self.reconnects} cancels={self.cancels} copy-failures={self.copy_failures}")
