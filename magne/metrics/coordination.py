"""Metrics of the fleet-wide features of a worker: its scheduler (magne.leader) and its gate (magne.gate).

Read at scrape time on the HTTP server's thread from plain attributes (racy reads of ints and dicts copied
in one C call); nothing is counted on the task path for them.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector


class CoordinationCollector(Collector):
    """`parts()` returns (scheduler or None, gate or None): both may appear after the collector is registered."""

    def __init__(self, parts: Callable[[], tuple[Any, Any]]) -> None:
        self.parts = parts

    def collect(self) -> Iterator[Metric]:
        scheduler, gate = self.parts()
        if scheduler is not None:
            leading = GaugeMetricFamily("magne_scheduler_leader", "1 for each schedule this process leads (sends the "
                                        "ticks of), 0 for those it is a candidate for.", labels=["schedule"])
            led = dict(scheduler.led)
            for name in list(scheduler.tasks):
                leading.add_metric([name], 1 if name in led else 0)
            yield leading
            yield CounterMetricFamily("magne_scheduler_ticks_sent", "Ticks this process sent as a leader.",
                                      value=scheduler.sent)
            yield CounterMetricFamily("magne_scheduler_ticks_skipped", "Runs of ticks skipped by this process as a new "
                                      "leader because they were older than the grace.", value=scheduler.skipped)
        if gate is not None:
            held = GaugeMetricFamily("magne_limit_slots_in_use", "Concurrency tokens this process holds (runs of a "
                                     "capped task).", labels=["queue"])
            waiting = GaugeMetricFamily("magne_limit_waiting", "Messages of a limited task waiting at the gate for a "
                                        "slot or a rate token (holding no thread).", labels=["queue"])
            by_queue: dict[str, int] = {}
            for q, _gen, _tag in list(gate.held):
                by_queue[q] = by_queue.get(q, 0) + 1
            for q, w in list(gate.queues.items()):
                held.add_metric([q], by_queue.get(q, 0))
                waiting.add_metric([q], len(w.items))
            yield held
            yield waiting
            yield CounterMetricFamily("magne_limit_slot_waits", "Times a message found every concurrency slot taken.",
                                      value=gate.slot_waits)
            yield CounterMetricFamily("magne_limit_rate_waits", "Times a message found no rate token left.",
                                      value=gate.rate_waits)
