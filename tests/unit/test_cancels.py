"""Cancels without a broker: reading a message id from its header, the cancel set, the stream records a worker
accepts, and the runner's and watchdog's handling of a cancelled message (magne.cancels, magne.runner, magne.pool)."""

from __future__ import annotations

import threading
import time
from queue import SimpleQueue
from typing import Any

import orjson
import pytest
from pamqp import commands

from magne import wire
from magne.amqp import codec
from magne.cancels import CancelSet, Follower, check_ids, message_id_of
from magne.delivery import Delivery, Outcome
from magne.outgoing import json_header
from magne.pool import Pool
from magne.registry import Task

ran: list[str] = []


def cx_note(label: str) -> None:
    ran.append(label)


def cx_loop(label: str) -> None:
    ran.append(f"{label} started")
    end = time.monotonic() + 10
    while time.monotonic() < end:
        time.sleep(0.005)
    ran.append(f"{label} ended")


TASKS = {t.name: t for t in (Task(cx_note, "cx_note", "CX", retry_options={"max_retries": 3}),
                              Task(cx_loop, "cx_loop", "CX", retry_options={"max_retries": 3}))}


def delivery(name: str, *args: Any, mid: str | None = None) -> Delivery:
    mid = mid or wire.new_id()
    return Delivery(1, 1, "CX", wire.encode(name, args, {}, mid), codec.header_payload(wire.properties_for(mid), 0),
                    False)


@pytest.mark.parametrize("props", [
    {},
    {"message_id": "m-1"},
    {"message_id": "é" * 50, "content_type": "application/json", "content_encoding": "utf-8"},
    {"message_id": "m-2", "headers": {"x-magne-retries": 2, "nested": {"a": [1, "b"]}}, "delivery_mode": 2,
     "priority": 5, "correlation_id": "c", "reply_to": "r", "expiration": "1000", "app_id": "x"},
    {"headers": {"a": "b"}, "reply_to": "r", "message_type": "t"},
])
def test_message_id_of_reads_what_decoding_every_property_reads(props):
    header = codec.header_payload(commands.Basic.Properties(**props), 10)
    assert message_id_of(header) == codec.decode_properties(header).message_id


def test_message_id_of_magne_own_header_takes_the_short_way_and_reads_the_same():
    for mid in ("m", wire.new_id(), "é" * 100, "x" * 255):
        for priority in (None, 3):
            header = json_header(mid, 5, priority)
            assert message_id_of(header) == codec.decode_properties(header).message_id == mid
    for cut in range(40):
        message_id_of(json_header("abc", 5)[:cut])  # truncated: never a raise


def test_message_id_of_a_malformed_header_is_none_never_a_raise():
    header = codec.header_payload(commands.Basic.Properties(message_id="abc", headers={"k": "v"}), 1)
    for cut in range(len(header)):
        assert message_id_of(header[:cut]) in (None, "", "a", "ab", "abc")
    assert message_id_of(b"") is None


def test_the_cancel_set_remembers_ids_once_and_forgets_those_past_the_retention():
    s = CancelSet(keep=100.0)
    s.add(["a", "b", "a"], time.time())
    assert "a" in s and "c" not in s and list(s.fresh) == ["a", "b"]
    s.add([f"old{i}" for i in range(2000)], time.time() - 1000)  # past the window: pruned as the set grows
    assert len(s) < 100 and "a" in s


def test_a_worker_takes_only_well_formed_recent_records_and_sees_its_marker():
    s = CancelSet(keep=100.0)
    f = Follower(None, s, "stream")  # type: ignore[arg-type] - the client is only used by start()
    for bad in (b"[1]", b'"x"', b'{"cancel": "abc"}', b'{"other": 1}'):
        try:
            f._on_body(bad)
        except ValueError:
            pass
    assert len(s) == 0
    f._on_body(orjson.dumps({"cancel": ["ok", 5, "", "x" * 300, None], "at": time.time()}))
    f._on_body(orjson.dumps({"cancel": ["too-old"], "at": time.time() - 1000}))
    f._on_body(orjson.dumps({"cancel": ["no-time"], "at": "yesterday"}))
    assert set(s.ids) == {"ok", "no-time"}
    assert not f.caught_up.is_set()
    f._on_body(orjson.dumps({"marker": "someone else's"}))
    assert not f.caught_up.is_set()
    f._on_body(orjson.dumps({"marker": f.marker}))
    assert f.caught_up.is_set()


def test_ids_are_checked_before_anything_is_sent():
    assert check_ids(["a", "b", "a"]) == ["a", "b"]
    for bad in ([], [""], [5], ["x" * 256]):
        with pytest.raises(ValueError):
            check_ids(bad)


def test_a_cancelled_message_is_acked_without_running_and_others_run():
    ran.clear()
    pool = Pool(1, TASKS, SimpleQueue(), lambda d: None)
    d = delivery("cx_note", "cancelled")
    pool.runner.cancels.add([message_id_of(d.header) or ""], time.time())
    out = pool.run_one(d)
    assert out.outcome is Outcome.ACK and ran == [] and pool.runner.cancelled == 1
    out = pool.run_one(delivery("cx_note", "other"))
    assert out.outcome is Outcome.ACK and ran == ["other"]


def test_a_running_thread_task_gets_cancelled_raised_and_is_acked_not_retried():
    ran.clear()
    reported: SimpleQueue[Delivery] = SimpleQueue()
    work: SimpleQueue[Delivery | None] = SimpleQueue()
    pool = Pool(2, TASKS, work, reported.put, time_limit=30.0)
    pool.start()
    try:
        d = delivery("cx_loop", "long")
        work.put(d)
        deadline = time.monotonic() + 5
        while "long started" not in ran:
            assert time.monotonic() < deadline
            time.sleep(0.005)
        pool.cancel_running({"not-it"}, time.monotonic())
        time.sleep(0.05)
        assert ran == ["long started"]
        pool.cancel_running({message_id_of(d.header) or ""}, time.monotonic())
        out = reported.get(timeout=5)
        assert out is d and out.outcome is Outcome.ACK and ran == ["long started"] and pool.runner.cancelled == 1
        assert pool.busy() == 0 and pool.alive() == 2  # the thread goes on
    finally:
        pool.stop()
        pool.join(2.0)
        assert threading.active_count() >= 1


def test_a_flood_of_cancels_keeps_the_newest_within_a_bound(monkeypatch):
    monkeypatch.setattr("magne.cancels.MAX_KEPT", 1500)
    s = CancelSet(keep=1000.0)
    now = time.time()
    s.add([f"id{i}" for i in range(3000)], now - 10)
    s.add(["newest"], now)
    assert len(s) <= 3001 and "newest" in s
    s.add([f"more{i}" for i in range(3000)], now)
    assert len(s) <= 1500 and not any(k.startswith("id") for k in s.ids)  # the oldest went first


def test_cancelling_a_group_or_its_chord_cancels_its_members_that_have_not_run():
    """Issue 23: "cancelling a pipeline, group or chord id cancels what has not run yet". Group members are
    `<group>.<i>` and the chord's callback `<group>.callback` (magne.steps): a cancel of the group id, or of the
    chord's, covers them; an id that merely looks alike does not."""
    ran.clear()
    pool = Pool(1, TASKS, SimpleQueue(), lambda d: None)
    group, other = "01abc.g3", "01def.g3"
    pool.runner.cancels.add([group], time.time())
    for i in range(3):
        assert pool.run_one(delivery("cx_note", f"m{i}", mid=f"{group}.{i}")).reason == "cancelled"
    assert pool.run_one(delivery("cx_note", "cb", mid=f"{group}.callback")).reason == "cancelled"
    pool.runner.cancels.add([f"{other}.callback"], time.time())  # a chord's id covers its members
    assert pool.run_one(delivery("cx_note", "member", mid=f"{other}.0")).reason == "cancelled"
    for mid in ("01abc.g30.1", "01abc.x.1", "plain", "01abc.g3"[:-1] + ".1"):
        assert pool.run_one(delivery("cx_note", mid, mid=mid)).reason != "cancelled"
    assert ran == ["01abc.g30.1", "01abc.x.1", "plain", "01abc.g.1"]


def test_cancelling_a_pipeline_cancels_its_steps_that_have_not_run():
    """A pipeline's id is its last step's; every step carries it in its flow (x-magne-flow `pipe`): a cancel of the
    pipeline id stops a step that has not run yet, and a step of another pipeline runs."""
    ran.clear()
    pool = Pool(1, TASKS, SimpleQueue(), lambda d: None)

    def step(pipe: str, arg: str) -> Delivery:
        mid = wire.new_id()
        props = wire.properties_for(mid)
        props.headers = {wire.FLOW_HEADER: orjson.dumps({"pipe": pipe, "rest": []}).decode()}
        return Delivery(1, 1, "CX", wire.encode("cx_note", [arg], {}, mid), codec.header_payload(props, 0), False)

    pool.runner.cancels.add(["pipe-1"], time.time())
    assert pool.run_one(step("pipe-1", "first step")).reason == "cancelled"
    assert pool.run_one(step("pipe-2", "another pipeline's")).reason != "cancelled"
    assert ran == ["another pipeline's"]
