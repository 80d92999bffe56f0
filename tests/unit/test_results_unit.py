"""Results and pipelines without a broker: what a message that asks carries, what the worker publishes before its
ack (and that it acks only after the broker confirmed those), how a reader matches records, and the in-process
worker (magne.testing)."""

from __future__ import annotations

import asyncio
import datetime
import threading
import time
import uuid
from collections import deque
from queue import SimpleQueue
from types import SimpleNamespace

import pytest
from pamqp import commands
from test_settle import make, settled

import magne
from magne import testing, wire, workflow
from magne.amqp import codec
from magne.amqp.errors import PublishError
from magne.cancels import message_id_of
from magne.delivery import Delivery, Outcome
from magne.followers import Follower, Reader, Waiter
from magne.io.follow import Follow
from magne.policy import Failure, RetryPolicy, decide
from magne.pool import Pool
from magne.results import outcome
from magne.runner import Runner
from magne.steps import Step


def header(headers=None, mid="m1") -> bytes:
    return codec.header_payload(commands.Basic.Properties(message_id=mid, delivery_mode=2, headers=headers), 10)


def delivery(headers=None, tag=1, mid="m1") -> Delivery:
    d = Delivery(tag, 1, "q", b'{"func":"t","args":[]}', header(headers, mid), False)
    d.task = "t"
    return d


# -- the worker's half -------------------------------------------------------------------------------------
def test_only_messages_that_ask_are_looked_at():
    assert not workflow.asks(header())
    assert not workflow.asks(header({"traceparent": "00-x", "x-magne-retries": 2}))
    assert workflow.asks(header({workflow.RESULTS: True}))
    assert workflow.asks(header({workflow.FLOW: "{}"}))


def test_ids_tell_when_they_were_made_and_others_do_not():
    mid = workflow.new_id()
    assert len(mid) == 32 and abs(workflow.sent_at_ms(mid) - time.time() * 1000) < 5000
    assert workflow.sent_at_ms("my-own-id") is None and workflow.sent_at_ms("f" * 32) is None
    uuid4 = uuid.uuid4().hex  # magne's own ids before 2026-12-06, and many other publishers' ids
    assert workflow.sent_at_ms(mid[:12] + uuid4[12:]) is None  # a uuid4's version digit: never taken for a time
    plain = wire.new_id()  # a plain send's id carries its time too (a cancel's lookup starts there)
    assert len(plain) == 32 and abs(workflow.sent_at_ms(plain) - time.time() * 1000) < 5000
    assert all((u := uuid.UUID(wire.new_id())).version == 7 and u.variant == uuid.RFC_4122 for _ in range(200))
    assert workflow.sent_at_ms(f"{mid}.g3.1") == workflow.sent_at_ms(mid)


def test_a_value_that_is_not_json_becomes_a_failure_record():
    rec = wire.loads(workflow.record("m", "t", True, value={1, 2}).body)
    assert rec["ok"] is False and rec["reason"] == "result not JSON" and "JSON" in rec["error"]["message"]
    nxt = workflow.record("m", "t", True, value=2**70)
    assert nxt.routing_key == workflow.STREAM and wire.loads(nxt.body)["value"] == 2**70


def test_a_pipeline_step_publishes_the_next_with_its_value_appended():
    rest = [Step(magne.Task(lambda *a: 0, "b", "QB"), (10,)).spec("id2", False),
            Step(magne.Task(lambda *a: 0, "c", "QC"), (3,)).spec("id3", True)]
    d = delivery({workflow.FLOW: workflow.dumps({"pipe": "id3", "rest": rest}).decode()})
    workflow.on_success(d, "a", 3)
    [nxt] = d.follow
    assert (nxt.exchange, nxt.routing_key, nxt.message_id) == ("QB", "QB", "id2")
    assert wire.decode(nxt.body) == ("b", [10, 3], {})
    props = codec.decode_properties(nxt.header)
    assert props.message_id == "id2" and workflow.RESULTS not in props.headers
    flow = wire.loads(props.headers[workflow.FLOW])
    assert flow == {"pipe": "id3", "rest": rest[1:]}
    d2 = delivery(props.headers, mid="id2")
    workflow.on_success(d2, "b", 13)
    [last] = d2.follow
    last_props = codec.decode_properties(last.header)
    assert wire.decode(last.body) == ("c", [3, 13], {}) and last_props.headers == {workflow.RESULTS: True}


def test_a_failing_step_records_its_failure_as_the_pipelines():
    d = delivery({workflow.FLOW: workflow.dumps({"pipe": "P", "rest": []}).decode()}, mid="s2")
    d.reason, d.error = "task raised", {"type": "ValueError", "message": "no", "traceback": "tb"}
    [rec] = [wire.loads(n.body) for n in workflow.on_dead(d)]
    assert rec["id"] == "P" and rec["of"] == "s2" and rec["error"]["type"] == "ValueError"
    with pytest.raises(magne.TaskFailed, match="ValueError: no") as info:
        outcome(rec)
    assert info.value.traceback == "tb" and info.value.message_id == "s2"
    assert workflow.on_dead(delivery({"x-magne-retries": 1})) is None


def test_a_retry_copy_keeps_asking():
    d = delivery({workflow.RESULTS: True, "x-magne-retries": 0})
    decide(d, Failure("task raised", ValueError("x")), RetryPolicy(max_retries=3), 131072)
    assert d.outcome is Outcome.RETRY
    headers = codec.decode_properties(d.copy_header).headers
    assert headers[workflow.RESULTS] is True and headers[wire.RETRIES] == 1


# -- the I/O thread: follow-ups before the ack ---------------------------------------------------------------
def test_a_success_that_asked_is_acked_only_after_its_record_is_confirmed():
    s, sender, out, stats, _conn = make()
    d = delivery({workflow.RESULTS: True})
    workflow.on_success(d, "t", 5)
    plain = delivery(tag=2)
    assert s.drain(deque([d, plain]), 0.0) == 2
    assert settled(out) == [("ack", 2, False)]  # the plain one at once; the one that asked waits
    [f] = list(sender.queue)
    assert isinstance(f, Follow) and f.routing_key == workflow.STREAM
    sender.queue.clear()
    f.settle(PublishError("refused"))  # refused: published again after a backoff, still unacked
    assert settled(out) == [] and len(s.waiting) == 1
    s.service(time.monotonic() + 120)
    [f2] = list(sender.queue)
    f2.settle(None)
    assert settled(out) == [("ack", 1, True)] and stats.acked == 2


def test_a_dead_letter_that_asked_gets_its_failure_record_before_the_ack():
    s, sender, out, stats, _conn = make()
    d = delivery({workflow.RESULTS: True})
    decide(d, Failure("task raised", ValueError("boom")), None, 131072)
    s.drain(deque([d]), 0.0)
    [copy] = list(sender.queue)
    sender.queue.clear()
    copy.settle(None)
    assert settled(out) == []
    [f] = list(sender.queue)
    rec = wire.loads(f.nxt.body)
    assert rec["ok"] is False and rec["error"]["message"] == "boom" and rec["reason"] == "task raised"
    f.settle(None)
    assert settled(out) == [("ack", 1, True)] and stats.dead == 1 and stats.acked == 0


def test_follow_ups_of_an_older_channel_are_dropped():
    s, sender, out, _stats, _conn = make()
    d = delivery({workflow.RESULTS: True})
    workflow.on_success(d, "t", 5)
    s.drain(deque([d]), 0.0)
    [f] = list(sender.queue)
    s.reset(2, out)
    f.settle(None)
    assert settled(out) == [] and not s.follow.left


# -- the reader's matching ----------------------------------------------------------------------------------
class FakeClient:
    def __init__(self):
        self.acks = []
        self.session = type("S", (), {"subs": {}})()

    def submit(self, fn):
        fn()

    def ack(self, tag, gen, multiple=False):
        self.acks.append(tag)

    def consume(self, queue, on_message, prefetch, arguments):  # delivers `records` at once (a recount's follower)
        self.consumed = arguments
        for k, rec in enumerate(self.records):
            on_message(Msg(k + 1, workflow.dumps(rec)))
        return "c9"

    def cancel(self, tag):
        self.cancelled = tag


class Msg:
    def __init__(self, tag, body, offset=0):
        self.tag, self.gen, self.body = tag, 1, body
        self.header = header({"x-stream-offset": offset})


def test_a_follower_resumes_after_a_reconnect_where_it_was():
    from magne.engine.session import Subscription
    from magne.followers import ACK_EVERY

    client = FakeClient()
    r = Reader(client)
    f = Follower(0)
    f.tag = "c1"
    client.session.subs["c1"] = Subscription("c1", "s", print, arguments={"x-stream-offset": "first"})
    for i in range(ACK_EVERY):
        r._on_message(f, Msg(i + 1, workflow.dumps({"id": f"m{i}", "ok": True, "value": i}), offset=500 + i))
    assert client.acks == [ACK_EVERY]
    assert client.session.subs["c1"].arguments == {"x-stream-offset": 500 + ACK_EVERY}


def test_the_first_record_of_an_id_wins_and_waiters_get_it():
    r = Reader(FakeClient())
    f = Follower(0)
    w = Waiter("a", 0)
    r._register(w)
    r._on_message(f, Msg(1, workflow.dumps({"id": "a", "ok": True, "value": 1})))
    r._on_message(f, Msg(2, workflow.dumps({"id": "a", "ok": True, "value": 2})))
    r._on_message(f, Msg(3, b"not json"))
    assert w.record["value"] == 1
    late = Waiter("a", 0)
    r._register(late)
    assert late.record["value"] == 1 and not r.waiters


# -- in-process (magne.testing) --------------------------------------------------------------------------------
@magne.task(name="res_unit_add", results=True)
def add(a, b):
    return a + b


@magne.task(name="res_unit_boom")
def boom(x):
    raise ValueError(f"bad {x}")


@magne.task(name="res_unit_mul")
def mul(a, b):
    return a * b


@pytest.mark.parametrize("kw", [{"sync": True}, {"threads": 2}])
def test_results_and_pipelines_in_process(kw):
    with testing.worker(**kw) as w:
        assert magne.result(add.send(1, 2)) == 3
        assert add.call(2, 3) == 5
        with pytest.raises(magne.TaskFailed, match=r"res_unit_boom .*ValueError: bad 7") as info:
            boom.call(7)
        assert "Traceback" in info.value.traceback
        with pytest.raises(magne.ResultTimeout):
            magne.result(boom.send(1))  # it did not ask
        assert magne.pipeline([add.message(1, 2), add.message(10), mul.message(3)]).call() == 39
        pid = magne.pipeline([add.message(1, 2), boom.message(), mul.message(3)]).send()
        with pytest.raises(magne.TaskFailed, match="bad 3"):
            magne.result(pid)
        assert len(w.succeeded(mul)) == 1 and len(w.dead_letters(boom)) == 3  # the failed pipeline stopped


@magne.task(name="res_unit_total")
def total(values, extra=0):
    return sum(values) + extra


@pytest.mark.parametrize("kw", [{"sync": True}, {"threads": 2}])
def test_groups_and_chords_in_process(kw):
    with testing.worker(**kw) as w:
        gid = magne.group([add.message(i, i) for i in range(10)]).send()
        assert magne.group_result(gid) == [2 * i for i in range(10)]
        assert magne.group([add.message(i, 1) for i in range(10)]).then(total.message(extra=1)).call() == 56
        cid = magne.group([add.message(1, 1), boom.message(2)]).then(total.message()).send()
        with pytest.raises(magne.TaskFailed, match="bad 2"):
            magne.result(cid)
        with pytest.raises(magne.TaskFailed, match="bad 2"):
            magne.group_result(cid.removesuffix(".callback"))
        assert len(w.succeeded(total)) == 1
    with pytest.raises(ValueError, match="not a group id"):
        magne.group_result("nope")


# -- hostile flow headers -------------------------------------------------------------------------------------
@pytest.mark.parametrize("step", [
    {"task": "t", "queue": "amq.direct", "id": "x"},  # a reserved name
    {"task": "t", "queue": "", "id": "x"},
    {"task": 5, "queue": "Q", "id": "x"},
    {"task": "t", "queue": "Q", "id": "x", "qt": "stream"},
    {"task": "t", "queue": "Q", "id": "x", "args": "no"},
    "not a step",
    {"task": "t", "queue": workflow.STREAM, "id": "victim"},  # a forged "record" for another message's id
    {"task": "t", "queue": f"{workflow.STREAM}.chord.{'a' * 32}.g2", "id": "x"},  # a second callback in a gate
])
def test_a_pipeline_step_a_publisher_forged_becomes_a_failure_not_a_publish(step):
    d = delivery({workflow.FLOW: workflow.dumps({"pipe": "P", "rest": [step]}).decode(), workflow.RESULTS: True},
                 mid="s1")
    workflow.on_success(d, "t", 1)
    assert all(n.routing_key == workflow.STREAM for n in d.follow)  # records only, nothing to another queue
    recs = [wire.loads(n.body) for n in d.follow]
    assert {r["id"] for r in recs} == {"s1", "P"} and not any(r["ok"] for r in recs)


def test_a_chord_member_takes_only_its_own_groups_gate():
    from magne import chords

    gid = f"{workflow.new_id()}.g3"
    own = {"group": gid, "i": 0, "n": 3, "gate": chords.gate_queue(gid)}
    assert chords.member_flow(delivery({workflow.FLOW: workflow.dumps(own).decode()})) == own
    for bad in ({**own, "gate": "orders"}, {**own, "i": 3}, {**own, "group": "x", "gate": chords.gate_queue("x")},
                {**own, "n": 1, "i": 0}):  # a forged smaller size would fire the chord after one member
        assert chords.member_flow(delivery({workflow.FLOW: workflow.dumps(bad).decode()})) is None


def test_a_forged_member_cannot_record_another_chords_failure():
    gid = f"{workflow.new_id()}.g3"
    for flow in ({"group": gid, "gate": "anything"}, {"group": "x" * 100, "gate": f"{workflow.STREAM}.chord.{'x' * 100}"}):
        d = delivery({workflow.FLOW: workflow.dumps(flow).decode(), workflow.RESULTS: True}, mid="m")
        d.reason = "task raised"
        assert [wire.loads(n.body)["id"] for n in workflow.on_dead(d)] == ["m"]
    own = {"group": gid, "gate": f"{workflow.STREAM}.chord.{gid}", "i": 0, "n": 3}
    d = delivery({workflow.FLOW: workflow.dumps(own).decode()}, mid=f"{gid}.0")
    d.reason = "task raised"
    assert [wire.loads(n.body)["id"] for n in workflow.on_dead(d)] == [f"{gid}.callback"]


def test_a_forged_callback_size_does_not_wait_for_members():
    from magne import chords

    gid = f"{workflow.new_id()}.g2"
    for flow in ({"chord": gid, "n": 1_000_000}, {"chord": "x", "n": 2}):
        d = delivery({workflow.FLOW: workflow.dumps(flow).decode(), workflow.RESULTS: True})
        assert chords.callback_args(d, [1]) == [1]  # it runs as a plain task (no default publisher is touched)


def test_a_message_in_the_stream_that_is_no_record_answers_nobody():
    r = Reader(FakeClient())
    f = Follower(0)
    w = Waiter("victim", 0)
    r._register(w)
    r._on_message(f, Msg(1, wire.encode("t", [1], None, "victim")))  # a task body someone put in the stream
    r._on_message(f, Msg(2, workflow.dumps({"id": "victim", "ok": "yes"})))
    assert w.record is None and "victim" not in r.cache


def test_a_delivery_without_properties_still_runs():
    """A header too short to hold a flags word (a test's Delivery, a hand-made one) is no message that asked."""
    from magne.pool import Pool

    assert not workflow.asks(b"")
    pool = Pool(0, {"res_unit_add": add}, None, lambda d: None)
    d = pool.run_one(Delivery(1, 1, "q", wire.encode("res_unit_add", [1, 2]), b"", False))
    assert d.outcome is Outcome.ACK and d.follow is None


# -- a cancelled message that asked: its result says so (issue 23) --------------------------------------------
@magne.task(name="res_unit_cancelled")
def never_runs(x):
    raise AssertionError("a cancelled message must not run")


def test_a_cancelled_message_that_asked_gets_a_record_saying_so():
    pool = Pool(1, {never_runs.name: never_runs}, SimpleQueue(), lambda d: None)
    mid = workflow.new_id()
    flow = workflow.dumps({"pipe": "P", "rest": []}).decode()
    body = wire.encode(never_runs.name, [1], {}, mid)
    d = Delivery(1, 1, "q", body, header({workflow.RESULTS: True, workflow.FLOW: flow}, mid), False)
    pool.runner.cancels.add([message_id_of(d.header) or ""], time.time())
    out = pool.run_one(d)
    assert out.outcome is Outcome.ACK and out.reason == "cancelled"
    recs = {r["id"]: r for r in (wire.loads(n.body) for n in out.follow)}
    assert set(recs) == {mid, "P"}  # its own result and its pipeline's
    assert all(n.routing_key == workflow.STREAM for n in out.follow)
    with pytest.raises(magne.TaskFailed, match="cancelled") as info:
        outcome(recs[mid])
    assert info.value.reason == "cancelled" and info.value.error_type == "Cancelled"
    assert info.value.task == never_runs.name and out.task == ""  # the record names it; no metrics label from a body
    plain = Delivery(2, 1, "q", body, header(None, mid), False)  # it did not ask: nothing to publish
    assert pool.run_one(plain).follow is None


def test_a_message_cancelled_while_running_records_the_cancel_not_a_success():
    d = delivery({workflow.RESULTS: True})
    workflow.on_success(d, "t", 5)  # a success's record was made, then the cancel landed (the watchdog's copy)
    Runner({}, lambda d: None).was_cancelled(d, magne.Cancelled("cancelled while running"))
    [rec] = [wire.loads(n.body) for n in d.follow]
    assert rec["ok"] is False and rec["reason"] == "cancelled"



def test_a_join_recounts_when_the_shared_count_of_its_group_was_dropped(monkeypatch):
    """More groups in flight than GROUPS (or a catch-up follower replaying old ones) pushed a chord's count out:
    the member completing the set saw too few, and the callback never ran. It now recounts its group alone."""
    monkeypatch.setattr("magne.followers.GROUPS", 2)
    client = FakeClient()
    r, f = Reader(client), Follower(0)
    g = f"{workflow.new_id()}.g2"
    client.records = [{"id": f"{g}.0", "ok": True, "group": g, "i": 0, "rid": "r0"},
                      {"id": "a.0", "ok": True, "group": "A", "i": 0}, {"id": "b.0", "ok": True, "group": "B", "i": 0},
                      {"id": f"{g}.1", "ok": True, "group": g, "i": 1, "rid": "r1"}]
    w = Waiter("r1", 0, rid=True)
    r._register(w)
    for k, rec in enumerate(client.records):
        r._on_message(f, Msg(k + 1, workflow.dumps(rec)))
    assert w.record["succeeded"] == 1 and r.may_be_short(g)  # g's count was pushed out by A and B
    assert not r.may_be_short("B")
    assert r.recount(g, "r1", workflow.sent_at_ms(g) - 60_000, 5.0) == 2 and client.cancelled == "c9"
    assert isinstance(client.consumed["x-stream-offset"], datetime.datetime)


def test_a_cancelled_result_async_forgets_its_waiter_once_registered(monkeypatch):
    """Cancelled while its follower started (a web request gone), result_async left its waiter registered and its
    catch-up follower consuming the stream for the life of the process."""
    from magne import publisher, results

    class SlowReader:
        def __init__(self):
            self.forgotten = threading.Event()

        def waiter(self, mid, loop, future):
            time.sleep(0.3)  # a follower starting: the broker's consume-ok
            return "w", "f"

        def done(self, w, f):
            assert (w, f) == ("w", "f")
            self.forgotten.set()

    slow = SlowReader()
    pub = publisher.Publisher.__new__(publisher.Publisher)
    monkeypatch.setattr(results, "reader", lambda p: slow)

    async def main():
        task = asyncio.ensure_future(results.result_async("m", 5.0, publisher=pub))
        await asyncio.sleep(0.05)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await asyncio.get_running_loop().run_in_executor(None, slow.forgotten.wait, 5.0)

    asyncio.run(main())
    assert slow.forgotten.is_set()


def test_magne_result_of_a_group_id_prints_its_members_values(monkeypatch, capsys):
    """`magne result <group id>` waited for a record no group has, and said "no outcome yet"."""
    from magne import results

    class FakePublisher:
        def __init__(self, url):
            pass

        def close(self):
            pass

    gid = f"{workflow.new_id()}.g2"
    monkeypatch.setattr(results, "Publisher", FakePublisher)
    monkeypatch.setattr(results, "result", lambda mid, timeout, publisher=None: {f"{gid}.0": 5, f"{gid}.1": 7}[mid])
    assert results.print_result(gid, None, 1.0) == 0
    assert wire.loads(capsys.readouterr().out) == {"id": gid, "ok": True, "value": [5, 7]}


def test_a_result_in_the_cache_starts_no_follower():
    """A second read of an id of one's own started a follower from the stream's first record (24 h of records read
    again, flooding the cache) although the cache held the answer."""
    client = FakeClient()
    client.records = []
    r = Reader(client)
    r._on_message(Follower(0), Msg(1, workflow.dumps({"id": "my-own-id", "ok": True, "value": 7})))
    w, f = r.waiter("my-own-id")
    assert w.record["value"] == 7 and not hasattr(client, "consumed") and not r.followers
    assert w.signal.wait(0)  # the caller's wait sees the answer
    r.done(w, f)


def test_records_with_an_index_outside_the_group_do_not_count_towards_it():
    """A record in the stream with index 7 for a group of 2 counted: the set looked complete after one member."""
    r, f = Reader(FakeClient()), Follower(0)
    g = f"{workflow.new_id()}.g2"
    r._on_message(f, Msg(1, workflow.dumps({"id": "x", "ok": True, "group": g, "i": 7})))
    w = Waiter("r0", 0, rid=True)
    r._register(w)
    r._on_message(f, Msg(2, workflow.dumps({"id": f"{g}.0", "ok": True, "group": g, "i": 0, "rid": "r0"})))
    assert w.record["succeeded"] == 1


def test_a_member_that_runs_after_the_callback_finds_no_gate_and_is_done(monkeypatch):
    """The callback deletes its gate (a quorum queue per chord stayed a week); a member running again afterwards
    gets 404 from basic.get: taken long ago, not a failed join run again forever."""
    from magne import chords, publisher
    from magne.amqp.errors import ChannelClosed

    class GoneClient:
        def get(self, queue):
            raise ChannelClosed(1, 404, "NOT_FOUND - no queue")

    assert chords.fire(GoneClient(), "g") is None

    class FastCallback:  # took the callback; it ran and deleted the gate before our passive declare
        session = SimpleNamespace(gen=1, write=lambda data, gen: None)

        def get(self, queue):
            return (5, b"", b"")

        def submit(self, fn):
            fn()

        def queue_counts(self, queue):
            raise ChannelClosed(1, 404, "NOT_FOUND - no queue")

    assert chords.fire(FastCallback(), "g") is None

    deleted = []
    fake = publisher.Publisher.__new__(publisher.Publisher)
    fake._running = lambda: SimpleNamespace(call=lambda method, reply: deleted.append(method.queue))
    monkeypatch.setattr(chords, "default_publisher", lambda: fake)
    gid = f"{workflow.new_id()}.g2"
    monkeypatch.setattr(chords.results, "result", lambda mid, timeout: int(mid[-1]) * 10)
    d = delivery({workflow.FLOW: workflow.dumps({"chord": gid, "n": 2, "queue": "q"}).decode(), workflow.RESULTS: True})
    assert chords.callback_args(d, [1]) == [1, [0, 10]]
    assert deleted == [chords.gate_queue(gid)]
