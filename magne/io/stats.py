"""Counters written only by the I/O thread; read (racily, for reports and metrics) by other threads.

Plain ints and dicts, never a lock: the I/O thread must never take a lock that task code
can take, and prometheus_client's metric objects take one on every inc(). A scrape reads
these on the HTTP server's thread (magne.metrics); a read racing a write sees the value
before or after it, both fine for monotonic counters. Dicts are copied with `.copy()`
(one C call under the GIL) before a reader iterates them, since the I/O thread may add a key.

`Stats` is always there and costs the hot path what it did (a few attribute increments per
message). `Tally` exists only with `--metrics`: the per-queue and per-task counts, the ack
batch sizes and the loop's lag; the I/O thread checks `tally is not None` where it would
count, so metrics off cost one local-variable test per message and nothing else. Its keys
are bounded (invariant 9): queues are the consumed ones, tasks the registered ones (anything
else counts as "unknown"), causes a fixed set; a message can never add a series.
"""

from __future__ import annotations

import bisect
import dataclasses

UNKNOWN = "unknown"  # the task label of a message that names no registered task (or was never decoded)

# Upper bounds, in seconds or messages, of the histograms the I/O thread keeps (cumulative at scrape).
LAG_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
ACK_BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)
CONFIRM_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


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
    connect_failures: int = 0  # attempts to (re)connect that failed
    given_back: int = 0  # of `requeued`: prefetched deliveries that never started (basic.nack, requeue)

    def __post_init__(self) -> None:
        # Not dataclass fields: as_dict() and the status line stay the flat ints they were.
        self.reconnect_causes: dict[str, int] = {}  # cause of the loss a reconnect followed -> reconnects
        self.tally: Tally | None = None  # set by the worker when --metrics is on, before the I/O thread starts

    def as_dict(self) -> dict[str, int]:
        return dataclasses.asdict(self)

    def line(self) -> str:
        return (f"delivered={self.delivered} acked={self.acked} retried={self.retried} dead-lettered={self.dead} "
                f"requeued={self.requeued} redelivered={self.redelivered} stale={self.stale} "
                f"reconnects={self.reconnects} cancels={self.cancels} copy-failures={self.copy_failures}")


class Histogram:
    """Bucket counts and a sum, written by one thread without a lock (the I/O thread here)."""

    __slots__ = ("bounds", "counts", "sum")

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)  # the last one is +Inf
        self.sum = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.bounds, value)] += 1
        self.sum += value

    def snapshot(self) -> tuple[list[int], float]:
        """(counts per bucket, not cumulative; sum). Any thread."""
        return list(self.counts), self.sum


class Tally:
    """What --metrics adds to Stats. Written by the I/O thread only (see the module docstring)."""

    __slots__ = ("known", "delivered", "redelivered", "acked", "retried", "dead", "requeued", "ack_batch", "lag",
                 "confirm")

    def __init__(self, known_tasks: frozenset[str] | set[str]) -> None:
        self.known = frozenset(known_tasks)
        self.delivered: dict[str, int] = {}  # queue -> count
        self.redelivered: dict[str, int] = {}  # queue -> count
        self.acked: dict[tuple[str, str], int] = {}  # (queue, task) -> count
        self.retried: dict[tuple[str, str], int] = {}
        self.dead: dict[tuple[str, str], int] = {}
        self.requeued: dict[tuple[str, str], int] = {}
        self.ack_batch = Histogram(ACK_BATCH_BUCKETS)  # messages settled per ack write-out (one drain)
        self.lag = Histogram(LAG_BUCKETS)  # how late the loop ran its timers (see magne/io/loop.py)
        self.confirm = Histogram(CONFIRM_BUCKETS)  # publishing link: copy published -> broker's confirm

    def label(self, task: str) -> str:
        """The task label of a message: its task if registered, else "unknown" (bounded cardinality)."""
        return task if task in self.known else UNKNOWN

    def count(self, table: dict[tuple[str, str], int], queue: str, task: str) -> None:
        """A cold-path outcome (retry, dead letter, requeue): its task checked against the registered ones."""
        key = (queue, task if task in self.known else UNKNOWN)
        table[key] = table.get(key, 0) + 1
