"""Review of cancel, inspect, events and the dashboard (issue 23): hostile input and the paths a cancel can miss."""

from __future__ import annotations

import time
from queue import SimpleQueue

import orjson
from pamqp import commands

from magne import formats
from magne.amqp import codec
from magne.cancels import CancelSet, Follower
from magne.delivery import Delivery, Outcome
from magne.pool import Pool
from magne.registry import Task

ran: list[int] = []


def rv_add(a: int, b: int = 0) -> None:
    ran.append(a + b)


TASKS = {"app.add": Task(rv_add, "app.add", "default")}
DRAMATIQ = formats.Accept(frozenset({"dramatiq"}), frozenset({"default"}))


def dramatiq_delivery(mid: str) -> Delivery:
    """A message as dramatiq's RabbitmqBroker publishes it: its id in the body, no message_id property."""
    body = orjson.dumps({"queue_name": "default", "actor_name": "app.add", "args": [1, 2], "kwargs": {},
                         "options": {}, "message_id": mid, "message_timestamp": 1})
    return Delivery(1, 1, "default", body, codec.header_payload(commands.Basic.Properties(delivery_mode=2),
                                                                len(body)), False)


def test_a_cancelled_dramatiq_message_is_not_run():
    ran.clear()
    pool = Pool(1, TASKS, SimpleQueue(), lambda d: None)
    pool.runner.accept = DRAMATIQ
    pool.runner.cancels.add(["dq-1"], time.time())
    out = pool.run_one(dramatiq_delivery("dq-1"))
    assert out.outcome is Outcome.ACK and out.reason == "cancelled" and ran == []
    out = pool.run_one(dramatiq_delivery("dq-2"))
    assert out.outcome is Outcome.ACK and out.reason != "cancelled" and ran == [3]


def test_a_cancel_dated_in_the_future_is_forgotten_with_its_window():
    s = CancelSet(keep=100.0)
    f = Follower(None, s, "stream")  # type: ignore[arg-type] - the client is only used by start()
    f._on_body(orjson.dumps({"cancel": ["forged"], "at": time.time() + 10 ** 9}))
    assert s.ids["forged"] <= time.time()  # not 30 years from now: pruned once its window has passed


def test_a_flood_of_cancels_never_holds_more_than_the_bound(monkeypatch):
    monkeypatch.setattr("magne.cancels.MAX_KEPT", 4000)
    s = CancelSet(keep=1000.0)
    now = time.time()
    most = 0
    for batch in range(40):
        s.add([f"b{batch}-{i}" for i in range(500)], now - 40 + batch)
        most = max(most, len(s))
    assert most <= 4000 + 500 and "b39-0" in s
