"""Review of cancel, inspect, events and the dashboard (issue 23): hostile input and the paths a cancel can miss."""

from __future__ import annotations

import json
import time
from queue import SimpleQueue

import orjson
from pamqp import commands
from starlette.testclient import TestClient

from magne import control, controlcli, formats
from magne.amqp import codec
from magne.cancels import CancelSet, Follower
from magne.dashboard.app import Dashboard
from magne.dashboard.history import History
from magne.dashboard.page import live
from magne.delivery import Delivery, Outcome
from magne.engine.session import Delivered
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


# -- the dashboard and inspect, fed by anyone who may write the events stream or answer the control exchange ---------

def forged_state(records: list[dict], workers: list[dict] | None = None) -> dict:
    h = History()
    h.add(records)
    return {"queues": [], "workers": workers or [], "queue_source": "x", "updated": time.time(),
            "history": h.snapshot(), "actions": False}


def test_forged_event_times_and_durations_do_not_break_the_page_or_its_json():
    now = time.time()
    bad = [{"t": 1e300, "event": "dead-lettered", "task": "t", "reason": "r"},
           {"t": -1e300, "event": "retried", "task": "t"},
           {"t": now, "event": "succeeded", "task": "t", "duration": 1e308},
           {"t": now, "event": "succeeded", "task": "t", "duration": 1e308},
           {"t": now, "event": "dead-lettered", "task": "t", "reason": "x" * 1_000_000, "id": ["not", "an id"]}]
    state = forged_state(bad)
    live(state)  # renders (a time past any clock raised OverflowError, and the page answered 500 while it was kept)
    json.dumps(state, allow_nan=False)  # what starlette's JSONResponse does: inf latencies made /api/state a 500
    assert max(len(str(v)) for f in state["history"]["failures"] for v in f.values()) <= 600


def test_events_in_future_minutes_do_not_pile_up():
    h = History()
    now = time.time()
    h.add([{"t": now + 60 * 10 * i, "event": "succeeded", "task": "t"} for i in range(1, 2000)])
    assert len(h.tasks["t"].minutes) <= 2 and h.tasks["t"].counts["succeeded"] > 0


def test_inspect_answers_that_are_not_a_workers_are_dropped_and_shown_escaped():
    r = control.Replies(None)  # type: ignore[arg-type] - only _on_reply is used
    got: list = []
    r.waiting["c"] = got
    header = codec.header_payload(commands.Basic.Properties(correlation_id="c"), 0)
    for body in ({"pid": "1", "host": "h", "running": [], "queues": []}, {"pid": 1, "host": "h", "running": "abc"},
                 {"pid": 1, "host": "h", "running": [], "queues": [1]}, [1]):
        r._on_reply(Delivered(1, 1, header, orjson.dumps(body), False))
    assert got == []
    evil = {"pid": 1, "host": "h\x1b]0;owned\x07", "queues": ["q"], "time_limit": None,
            "running": [{"task": "<b>", "message_id": "\x1b[2J", "time_limit": None, "started": "x"}]}
    r._on_reply(Delivered(1, 1, header, orjson.dumps(evil), False))
    assert len(got) == 1
    out = "\n".join(controlcli.text(got))
    assert "\x1b" not in out and "\x07" not in out and "time limit none" in out
    page = live(forged_state([], got))
    assert "<b>" not in page and "&lt;b&gt;" in page


def test_the_dashboard_cancels_a_list_of_ids_never_a_string_one_character_at_a_time(monkeypatch):
    sent: list = []
    monkeypatch.setattr("magne.cancels.cancel", lambda *ids, publisher=None: sent.extend(ids) or list(ids))
    dash = Dashboard(None, [], allow_actions=True, token="tok")
    with TestClient(dash.app()) as web:
        bad = web.post("/api/cancel", json={"ids": "abc"}, headers={"Authorization": "Bearer tok"})
        assert bad.status_code == 400 and sent == []
        assert web.post("/api/cancel", json={"ids": ["a"]}, headers={"Authorization": "Bearer nope"}).status_code == 401
        ok = web.post("/api/cancel", json={"ids": ["m-1"]}, headers={"Authorization": "Bearer tok"})
        assert ok.status_code == 200 and sent == ["m-1"]
