"""Review of cancel, inspect, events and the dashboard (issue 23): hostile input and the paths a cancel can miss."""

from __future__ import annotations

import json
import threading
import time
import types
from collections import deque
from queue import SimpleQueue
from typing import Any

import orjson
from pamqp import commands
from starlette.testclient import TestClient

from magne import cancels, control, controlcli, controlguard, events, formats, wire, workflow
from magne.amqp import codec
from magne.amqp.errors import BrokerTimeout
from magne.asyncpool import AsyncPool
from magne.asyncrun import Run
from magne.cancels import CancelSet, Follower
from magne.dashboard.app import Dashboard
from magne.dashboard.history import History
from magne.dashboard.page import live
from magne.delivery import Delivery, Outcome
from magne.engine.session import Delivered
from magne.pool import Pool
from magne.registry import Task
from magne.runner import Runner

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


# -- a worker that starts while the broker does not answer yet ------------------------------------------------------

class SlowBroker:
    """A Client whose first calls time out (the broker was not up yet), then answers, and hands a published record
    back to the stream's consumers, as a stream would: those attached, and those attaching later (from its start)."""

    def __init__(self, failures: int) -> None:
        self.failures = failures
        self.consumers: dict[str, Any] = {}
        self.on_cancel: dict[str, Any] = {}
        self.ended: list[str] = []
        self.cancelled: list[str] = []
        self.log: list[bytes] = []  # the stream
        self.order: list[str] = []  # "publish" and "consume", as they came

    def call(self, method: Any, *replies: Any, **kw: Any) -> Any:
        if self.failures:
            self.failures -= 1
            raise BrokerTimeout("no Queue.DeclareOk from the broker within 30s")
        return commands.Queue.DeclareOk(getattr(method, "queue", "") or "q")

    def consume(self, queue: str, on_message: Any, **kw: Any) -> str:
        tag = f"tag{len(self.consumers) + len(self.ended)}"
        self.order.append("consume")
        self.consumers[tag] = on_message
        self.on_cancel[tag] = kw.get("on_cancel")
        for body in self.log:
            on_message(Delivered(1, 1, self._header(body), body, False))
        return tag

    @staticmethod
    def _header(body: bytes) -> bytes:
        return codec.header_payload(commands.Basic.Properties(headers={"x-stream-offset": 1}), len(body))

    def delete_stream(self) -> None:
        """An operator deletes the stream (to re-create it with other settings): the broker cancels its readers."""
        for tag in list(self.consumers):
            del self.consumers[tag]
            self.ended.append(tag)
            if self.on_cancel.get(tag):
                self.on_cancel[tag]()

    def cancel(self, tag: str) -> None:
        self.cancelled.append(tag)
        self.consumers.pop(tag, None)

    def ack(self, tag: int, gen: int) -> None:
        pass

    def publish_confirmed(self, exchange: str, rk: str, body: bytes, props: Any) -> None:
        self.log.append(body)
        self.order.append("publish")
        for on_message in list(self.consumers.values()):
            on_message(Delivered(1, 1, self._header(body), body, False))


def test_cancels_are_read_once_the_broker_answers_and_the_pool_waits_for_them(monkeypatch):
    monkeypatch.setattr("magne.control.time.sleep", lambda s: None)
    client = SlowBroker(failures=3)
    pub = types.SimpleNamespace(_running=lambda: client)
    c = control.Control(pub, CancelSet(), dict, lambda ids, now: None)  # type: ignore[arg-type]
    c._listen = lambda: None  # type: ignore[method-assign] - inspect's queue is not what this test is about
    ready_after_failure: list[bool] = []
    real = client.call

    def call(*a: Any, **kw: Any) -> Any:
        if client.failures < 3:
            ready_after_failure.append(c.ready.is_set())
        return real(*a, **kw)

    client.call = call  # type: ignore[method-assign]
    c._start()
    assert c.follower is not None and c.follower.caught_up.is_set() and c.ready.is_set()
    assert not any(ready_after_failure)  # no task ran while the cancels were unknown
    client.publish_confirmed("", "s", orjson.dumps({"cancel": ["late"], "at": time.time()}), None)
    assert "late" in c.cancels and len(client.consumers) == 1


# -- events while the broker cannot take them -----------------------------------------------------------------------

class BlockedClient:
    """The publisher's client while the broker is blocked (a memory alarm) or away: messages wait in it."""

    def __init__(self) -> None:
        self.waiting: list[Any] = []
        self.room = False

    def call(self, method: Any, *replies: Any, **kw: Any) -> Any:
        return commands.Queue.DeclareOk(method.queue)

    def has_room(self, limit: int) -> bool:
        return self.room and len(self.waiting) < limit

    def publish(self, msg: Any) -> None:
        self.waiting.append(msg)


def test_events_stay_in_their_bounded_buffer_while_the_client_has_no_room(monkeypatch):
    monkeypatch.setattr("magne.events.MAX_BUFFER", 5000)
    client = BlockedClient()
    ev = events.Events(lambda: client)
    ev.buf = deque(maxlen=5000)
    record = ev.wrap(lambda d: None)
    d = Delivery(1, 1, "q", b"{}", codec.header_payload(commands.Basic.Properties(message_id="m"), 2), False)
    d.task = "t"
    for _ in range(20_000):
        record(d)
    ev._stop.set()
    ev.run()  # one tick (stopping): the client is blocked, so nothing is handed to it
    assert client.waiting == [] and len(ev.buf) == 5000  # the oldest were dropped, as documented
    client.room = True
    ev.run()
    assert len(client.waiting) == 5 and not ev.buf


# -- inspect requests from anyone who may publish to magne.control --------------------------------------------------

def test_inspect_answers_go_only_to_server_named_reply_queues_and_a_flood_is_throttled():
    client = BlockedClient()
    c = control.Control(types.SimpleNamespace(), CancelSet(), lambda: {"pid": 1}, lambda ids, now: None)  # type: ignore[arg-type]
    c.client = client  # type: ignore[assignment]

    def request(reply_to: str) -> None:
        header = codec.header_payload(commands.Basic.Properties(reply_to=reply_to, correlation_id="c"), 20)
        c._on_request(Delivered(1, 1, header, orjson.dumps({"op": "inspect"}), False))

    request("reports")  # a task queue: every worker would have published a bad message into it
    request("magne.cancels")
    assert client.waiting == []
    for _ in range(1000):
        request("amq.gen-abc")
    assert 1 <= len(client.waiting) <= 2 * controlguard.ANSWERS_PER_SECOND  # within at most two seconds of clock


# -- an async run that finishes as its cancel arrives ---------------------------------------------------------------

def test_a_cancel_that_reaches_the_loop_after_the_run_finished_does_not_cancel_its_follow_ups():
    """The watchdog saw the run unfinished; by the time the loop thread runs the cancel, it finished and is making its
    follow-ups (results, next step): cancelling its asyncio Task then requeued a message that had succeeded."""
    aio = AsyncPool(Runner(TASKS, lambda d: None), lambda d: None, 4)
    d = Delivery(1, 1, "q", b"{}", codec.header_payload(commands.Basic.Properties(message_id="m-9"), 2), False)
    run = Run(d, TASKS["app.add"], [], {}, 10.0)
    cancelled: list[bool] = []
    run.atask = types.SimpleNamespace(cancel=lambda: cancelled.append(True))  # type: ignore[assignment]
    aio.running[id(run)] = run

    def later(fn: Any, r: Run) -> None:  # the loop thread gets to it after the run finished
        r.finished = True
        fn(r)

    aio.loop = types.SimpleNamespace(call_soon_threadsafe=later)  # type: ignore[assignment]
    aio.cancel_running({"m-9"}, time.monotonic())
    assert cancelled == []


def test_a_worker_follows_the_cancels_stream_again_after_the_broker_ended_its_reader():
    client = SlowBroker(failures=0)
    c = control.Control(types.SimpleNamespace(_running=lambda: client), CancelSet(), dict,  # type: ignore[arg-type]
                        lambda ids, now: None)
    c._listen = lambda: None  # type: ignore[method-assign]
    c._start()
    client.delete_stream()
    assert c.follower is not None and c.follower.lost  # it knows its reader ended
    c.check(time.monotonic())
    deadline = time.monotonic() + 5
    while not client.consumers:  # resumed on a magne-control thread
        assert time.monotonic() < deadline
        time.sleep(0.01)
    client.publish_confirmed("", "s", orjson.dumps({"cancel": ["after"], "at": time.time()}), None)
    assert "after" in c.cancels


# -- a cancelled message that asked for its result ------------------------------------------------------------------

def test_a_cancelled_message_that_asked_for_its_result_gets_a_cancelled_result_record():
    """Else `result.get()` of a cancelled message waited until its timeout, and a chord with a cancelled member
    never heard of it."""
    ran.clear()
    pool = Pool(1, TASKS, SimpleQueue(), lambda d: None)
    mid = wire.new_id()
    body = wire.encode("app.add", [1, 2], {}, mid)
    d = Delivery(1, 1, "default", body, workflow.header_for(mid, len(body), True, None), False)
    pool.runner.cancels.add([mid], time.time())
    out = pool.run_one(d)
    assert out.outcome is Outcome.ACK and out.reason == "cancelled" and ran == []
    assert out.follow is not None and len(out.follow) == 1
    rec = orjson.loads(out.follow[0].body)
    assert rec["id"] == mid and rec["ok"] is False and rec["reason"] == "cancelled"
    assert rec["error"]["type"] == "Cancelled"


def test_a_flood_of_fresh_cancels_keeps_the_watchdogs_watch_list_bounded():
    s = CancelSet(keep=1000.0)
    looked_at: list[int] = []
    c = control.Control(types.SimpleNamespace(), s, dict, lambda ids, now: looked_at.append(len(ids)))  # type: ignore[arg-type]
    now = time.monotonic()
    for tick in range(30):  # 30 ticks of 10,000 new cancels each, within the watch window
        s.add([f"t{tick}-{i}" for i in range(10_000)], time.time())
        c.check(now + tick * 0.1)
    assert max(looked_at) <= cancels.MAX_IDS and len(c._watch) <= cancels.MAX_IDS


def test_a_cancelled_celery_message_is_not_run():
    ran.clear()
    pool = Pool(1, TASKS, SimpleQueue(), lambda d: None)
    pool.runner.accept = formats.Accept(frozenset({"celery"}))
    pool.runner.cancels.add(["c-1"], time.time())
    headers = {"lang": "py", "task": "app.add", "id": "c-1", "retries": 0, "timelimit": [None, None], "eta": None,
               "expires": None}
    body = orjson.dumps([[1, 2], {}, {"callbacks": None, "errbacks": None, "chain": None, "chord": None}])
    header = codec.header_payload(commands.Basic.Properties(content_type="application/json", content_encoding="utf-8",
                                                            correlation_id="c-1", headers=headers), len(body))
    out = pool.run_one(Delivery(1, 1, "default", body, header, False))
    assert out.outcome is Outcome.ACK and out.reason == "cancelled" and ran == []


# -- a task that turns Cancelled into an exception of its own --------------------------------------------------------

started_wrapping = threading.Event()


def rv_wrapping() -> None:
    try:
        started_wrapping.set()
        end = time.monotonic() + 10
        while time.monotonic() < end:
            time.sleep(0.005)
    except BaseException as exc:  # what some libraries do: wrap everything
        raise RuntimeError("wrapped") from exc


def test_a_cancelled_task_that_wraps_cancelled_is_still_cancelled_not_dead_lettered():
    tasks = {"rv_wrapping": Task(rv_wrapping, "rv_wrapping", "default", retry_options={"max_retries": 0})}
    reported: SimpleQueue[Delivery] = SimpleQueue()
    work: SimpleQueue[Delivery | None] = SimpleQueue()
    pool = Pool(1, tasks, work, reported.put, time_limit=30.0)
    pool.start()
    try:
        mid = wire.new_id()
        d = Delivery(1, 1, "default", wire.encode("rv_wrapping", [], {}, mid),
                     codec.header_payload(wire.properties_for(mid), 0), False)
        work.put(d)
        assert started_wrapping.wait(5)
        pool.cancel_running({mid}, time.monotonic())
        out = reported.get(timeout=5)
        assert out.outcome is Outcome.ACK and out.reason == "cancelled"  # was DEAD: "task raised" RuntimeError
    finally:
        pool.stop()
        pool.join(2.0)


def test_the_cancels_marker_is_in_the_stream_before_the_follower_attaches():
    """A stream that never held a message resolves a reader's timestamp offset to its end as it attaches (RabbitMQ
    3.10): a cancel written in that moment would be skipped. The worker's marker goes in first (streams.mark)."""
    client = SlowBroker(failures=0)
    pub = types.SimpleNamespace(_running=lambda: client)
    c = control.Control(pub, CancelSet(), dict, lambda ids, now: None)  # type: ignore[arg-type]
    c._listen = lambda: None  # type: ignore[method-assign]
    c._start()
    assert c.follower is not None and c.follower.caught_up.is_set()
    assert client.order[:2] == ["publish", "consume"], client.order
