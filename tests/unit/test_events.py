"""Task events without a broker (magne.events): what a reporting thread records, the batch the flusher writes, and
what a reader gets back; and the dashboard's history built from them (magne.dashboard.history)."""

from __future__ import annotations

import gc
import time

import orjson
import pytest

from magne import wire
from magne.amqp import codec
from magne.dashboard.history import History
from magne.delivery import Delivery, Outcome
from magne.events import Events, parse


class Client:
    alive = True

    def __init__(self) -> None:
        self.sent: list[bytes] = []

    def has_room(self, _n: int) -> bool:
        return True

    def publish(self, msg) -> None:
        # the body is the last frame's payload: decode the frames back (one small message: method, header, body)
        data, frames, pos = msg.data, [], 0
        while pos < len(data):
            size = int.from_bytes(data[pos + 3:pos + 7], "big")
            frames.append(data[pos + 7:pos + 7 + size])
            pos += 8 + size
        self.sent.append(b"".join(frames[2:]))


def delivery(task: str, outcome: Outcome, reason: str = "", error: dict | None = None, started: float = 0.0):
    mid = wire.new_id()
    d = Delivery(1, 1, "q", b"{}", codec.header_payload(wire.properties_for(mid), 2), False)
    d.task, d.outcome, d.reason, d.error, d.started = task, outcome, reason, error, started
    return d, mid


def test_each_outcome_is_one_event_in_one_batch_and_reads_back_as_dicts():
    reported = []
    ev = Events(lambda: client)
    client = Client()
    report = ev.wrap(reported.append)
    now = time.monotonic()
    ok, ok_id = delivery("t", Outcome.ACK, started=now - 0.25)
    dead, dead_id = delivery("t", Outcome.DEAD, "task raised", {"type": "ValueError", "message": "x" * 1000}, now - 0.1)
    gone, gone_id = delivery("u", Outcome.ACK, "cancelled")
    for d in (ok, dead, gone):
        report(d)
    assert reported == [ok, dead, gone]  # the delivery goes on as before
    ev._flush(client)
    assert len(client.sent) == 1 and not ev.buf
    recs = {r["id"]: r for r in parse(client.sent[0])}
    assert recs[ok_id]["event"] == "succeeded" and 0.2 < recs[ok_id]["duration"] < 5
    assert "reason" not in recs[ok_id] and abs(recs[ok_id]["t"] - time.time()) < 5
    assert recs[dead_id]["event"] == "dead-lettered" and recs[dead_id]["reason"] == "task raised"
    assert recs[dead_id]["error"]["type"] == "ValueError" and len(recs[dead_id]["error"]["message"]) <= 310
    assert recs[gone_id]["event"] == "cancelled" and "started" not in recs[gone_id] and "reason" not in recs[gone_id]
    assert {r["pid"] for r in recs.values()} == {ev.pid}


def test_a_stop_publishes_every_record_left_partial_batch_included(monkeypatch):
    """The last pass used to stop at the partial batch: with 2,500 records waiting at a stop, 500 were dropped."""
    monkeypatch.setattr("magne.events.declare", lambda client, name=None: name)
    client = Client()
    ev = Events(lambda: client)
    report = ev.wrap(lambda d: None)
    ids = set()
    for _ in range(2500):
        d, mid = delivery("t", Outcome.ACK, started=time.monotonic())
        report(d)
        ids.add(mid)
    ev._stop.set()
    ev.run()  # the stop is already set: one pass, then it returns
    assert not ev.buf and len(client.sent) == 3
    assert {r["id"] for body in client.sent for r in parse(body)} == ids


@pytest.mark.parametrize("body", [b"[]", b"{}", b'{"fields": "x", "rows": []}', b'{"fields": [1], "rows": []}'])
def test_a_batch_that_is_not_one_is_refused(body):
    with pytest.raises(ValueError):
        parse(body)


def test_the_history_counts_each_event_once_and_keeps_failures_and_series_bounded():
    h = History()
    now = time.time()
    h.add([{"t": now, "event": "succeeded", "task": "a", "queue": "q", "duration": 0.01},
           {"t": now, "event": "dead-lettered", "task": "a", "queue": "q", "reason": "task raised",
            "error": {"type": "E", "message": "m"}, "id": "i"},
           {"t": float("inf"), "event": "succeeded", "task": "a"}, {"t": now, "event": 5, "task": "a"},
           {"t": now - 86400, "event": "succeeded", "task": "b", "queue": "q2"}])
    snap = h.snapshot()
    a = next(t for t in snap["tasks"] if t["task"] == "a")
    assert (a["succeeded"], a["failed"]) == (1, 1) and a["series_done"][-1] == 1 and len(a["series_done"]) == 60
    assert snap["failures"][0]["error"] == "E: m" and snap["queues"] == ["q", "q2"]
    b = next(t for t in snap["tasks"] if t["task"] == "b")
    assert b["succeeded"] == 1 and sum(b["series_done"]) == 0  # counted, but older than the hour shown
    h.add([{"t": now, "event": "retried", "task": "a", "queue": "q"}] * 200)
    assert len(h.snapshot()["failures"]) == 50


def test_events_json_is_what_orjson_writes():
    assert parse(orjson.dumps({"host": "h", "pid": 1, "fields": ["t", "event"], "rows": [[1.0, "succeeded", "extra"]]}))


def test_a_recorded_success_holds_no_object_the_garbage_collector_must_keep_tracking():
    """The buffer holds half a second of records (25,000 at 50,000 tasks/s). A record holding the Outcome member (an
    object the collector tracks) stayed tracked and was walked by every older collection: 83-99 ms of GC per 200,000
    raw messages against 7 ms with events off. A record of strings, bytes and floats is dropped from the collector's
    lists at its first pass."""
    ev = Events(lambda: Client())
    report = ev.wrap(lambda d: None)
    d, _mid = delivery("t", Outcome.ACK, started=time.monotonic())
    report(d)
    gc.collect(0)  # the youngest generation's pass: the first one a new record meets
    assert not gc.is_tracked(ev.buf[0])


@pytest.mark.parametrize("outcome", ["bogus", 99, None])
def test_a_delivery_whose_outcome_has_no_name_is_still_reported(outcome):
    """The record looks the outcome's name up on the reporting thread; whatever it holds, the delivery must reach
    the I/O thread (its message would stay unacked otherwise). The settling side has its own test for a bogus one."""
    reported = []
    ev = Events(lambda: Client())
    report = ev.wrap(reported.append)
    d, _mid = delivery("t", Outcome.ACK)
    d.outcome = outcome
    report(d)
    assert reported == [d]
