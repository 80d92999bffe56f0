"""What a worker answers on its control queue (magne.control), given that anyone who may publish to the fanout
exchange `magne.control` reaches every worker process at once.

- **Where an answer may go.** An inspect request names its reply queue (`reply_to`), and the worker publishes its
  answer there through the default exchange with its own permissions. Left open, one request would make every worker
  publish into any queue of the vhost (a task queue: a bad message per worker per request). `magne inspect` replies
  to a server-named exclusive queue (`amq.gen-...`, a name no client can declare), so only such a name is answered.
- **How often.** Each answer is a snapshot, its JSON and a publish on the publisher client's loop thread, the
  thread that also carries the tasks' own sends and the cancels stream. A flood of requests is answered at most
  ANSWERS_PER_SECOND times a second; the rest are dropped (an inspector waits a second: it asks once).

Both run on the client's loop thread (`Throttle.allow`, `reply_target_ok`): a comparison and a counter.
"""

from __future__ import annotations

import time
from typing import Any

from magne import logs

log = logs.Log("magne.control")

ANSWERS_PER_SECOND = 20
REPLY_PREFIX = "amq.gen-"  # the names RabbitMQ gives server-named queues (Replies declares queue="")


def reply_target_ok(reply_to: str | None) -> bool:
    """Whether a request's reply_to is a queue an answer may be published to (a server-named one)."""
    return bool(reply_to) and reply_to.startswith(REPLY_PREFIX) and len(reply_to) <= 255  # type: ignore[union-attr]


class Throttle:
    """At most `rate` requests a second are let through; one warning per second in which some were dropped."""

    __slots__ = ("rate", "second", "count", "dropped")

    def __init__(self, rate: int = ANSWERS_PER_SECOND) -> None:
        self.rate = rate
        self.second = 0
        self.count = 0
        self.dropped = 0

    def allow(self, now: float | None = None) -> bool:
        second = int(time.monotonic() if now is None else now)
        if second != self.second:
            if self.dropped:
                log.warning("dropped %d control requests beyond %d a second (a flood of magne.control requests)",
                            self.dropped, self.rate, event="control_flood")
            self.second, self.count, self.dropped = second, 0, 0
        self.count += 1
        if self.count > self.rate:
            self.dropped += 1
            return False
        return True


def well_formed(rec: Any) -> bool:
    """An answer shaped as `snapshot` makes it: anyone who may read the control exchange sees a request's reply_to and
    can answer it (what it says is escaped where it is shown; its shape must not break `magne inspect` either)."""
    if not isinstance(rec, dict) or type(rec.get("pid")) is not int or not isinstance(rec.get("host"), str):
        return False
    running, queues = rec.get("running"), rec.get("queues")
    return (isinstance(running, list) and all(isinstance(r, dict) for r in running)
            and isinstance(queues, list) and all(isinstance(q, str) for q in queues))
