"""python -m bench.events_cost: what task events (magne.events) add to a message's handling, measured in one process
in thread CPU time, so that a busy machine slows both sides alike: the pool thread's path for a no-op task (decode, run, decide:
Pool.run_one) against the same plus the event's append on the reporting thread and its share of the batch the
`magne-events` thread encodes. Alternating rounds, best of each; no broker (the batch goes to a stand-in client)."""

from __future__ import annotations

import time
from queue import SimpleQueue

from magne import wire
from magne.amqp import codec
from magne.delivery import Delivery
from magne.events import BATCH, Events
from magne.pool import Pool
from magne.registry import Task


def noop() -> None:
    pass


class _Client:
    def publish(self, msg: object) -> None:
        self.msg = msg


def main(rounds: int = 15) -> None:
    pool = Pool(1, {"noop": Task(noop, "noop", "bench")}, SimpleQueue(), lambda d: None)
    mids = [wire.new_id() for _ in range(BATCH)]
    ds = [Delivery(i, 1, "bench", wire.encode("noop", [], {}, m), codec.header_payload(wire.properties_for(m), 0), False)
          for i, m in enumerate(mids)]
    events = Events(lambda: _Client())
    report = events.wrap(lambda d: None)
    client = _Client()
    base, with_events = [], []
    for _ in range(rounds):
        t0 = time.thread_time()
        for d in ds:
            pool.run_one(d)
        base.append((time.thread_time() - t0) / BATCH)
        t0 = time.thread_time()
        for d in ds:
            report(pool.run_one(d))
        events._flush(client)
        with_events.append((time.thread_time() - t0) / BATCH)
    b, e = min(base), min(with_events)
    print(f"pool path per message: {b * 1e6:.2f} us; with events: {e * 1e6:.2f} us; events add {(e - b) * 1e6:.2f} us "
          f"({(e - b) / b * 100:.1f} % of the pool path; the whole worker spends more per message: its I/O thread)")


if __name__ == "__main__":
    main()
