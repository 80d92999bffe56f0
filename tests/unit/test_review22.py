"""Regression tests from the review of issue 22 (schedules, fleet-wide caps and rates)."""

from __future__ import annotations

import datetime as dt
from types import SimpleNamespace

from magne import task
from magne.amqp import names
from magne.amqp.errors import ChannelClosed
from magne.leader import Scheduler
from magne.schedule import UTC


@task(name="r22_every", every=10)
def r22_every():
    pass


class _Locks:
    """A Client as the scheduler sees it: its `locks` session, calls (declares) and confirmed publishes."""

    def __init__(self):
        self.locks = SimpleNamespace(conn=object())
        self.taken: set[str] = set()  # lock queues another connection holds
        self.declared: list[str] = []
        self.published: list[tuple[str, str]] = []

    def call(self, method, *replies, timeout=None, session=None):
        if isinstance(method, names.QueueDeclare):
            self.declared.append(method.queue)
            if method.exclusive and method.queue in self.taken:
                raise ChannelClosed(1, 405, "RESOURCE_LOCKED")

    def publish_confirmed(self, exchange, rk, body, header):
        self.published.append((exchange, rk))


def test_a_leader_whose_lock_queue_was_deleted_and_taken_by_another_stops_leading():
    now = dt.datetime(2026, 1, 1, 12, 0, 1, tzinfo=UTC)
    client = _Locks()
    s = Scheduler(lambda: client, [r22_every], stream="st", clock=now.timestamp)
    s.conn = client.locks.conn
    s.led["r22_every"] = now + dt.timedelta(seconds=9)  # leading, next tick in 9 s
    s.redeclare_at = float("inf")
    s._turn()
    assert s.leading() == ["r22_every"]
    client.taken.add("st.leader.r22_every")  # deleted under us, then declared by another worker
    s.next_try = 0.0
    s._turn()
    assert s.leading() == []  # before the fix it kept leading: two leaders, every tick sent twice
