"""Nested workflows without a broker (issue 21): groups as pipeline steps and pipelines as group members. What
`send()` plans (ids, headers, gates), what a worker publishes from a nested flow, which ids a failure is recorded
under, how old flow headers still read, build-time errors, and the same flows in magne.testing."""

from __future__ import annotations

from typing import Any

import pytest
from pamqp import commands

import magne
from magne import chords, publisher, testing, wire, workflow
from magne.amqp import codec
from magne.cancels import covered
from magne.delivery import Delivery, Outcome
from magne.localflow import LocalFlow
from magne.steps import Step


@magne.task(name="nest_add")
def add(a, b):
    return a + b


@magne.task(name="nest_inc")
def inc(x):
    return x + 1


@magne.task(name="nest_dbl")
async def dbl(x):
    return x * 2


@magne.task(name="nest_boom")
def boom(*args):
    raise ValueError(f"boom {list(args)}")


@magne.task(name="nest_obj")
def obj(*args):
    return object()  # not JSON


@magne.task(name="nest_total")
def total(values, extra=0):
    return sum(values) + extra


class Capture:
    """A default publisher that keeps what a flow's send() publishes: (queue, message id, body, headers)."""

    def __init__(self) -> None:
        self.out: list[tuple[str, str, tuple[Any, ...], dict[str, Any]]] = []

    def send(self, task, args=(), kwargs=None, message_id=None, headers=None, **_kw) -> str:
        self.out.append((task.queue, message_id, wire.decode(wire.encode(task.name, args, kwargs, message_id)),
                         dict(headers or {})))
        return message_id

    def publish(self, queue, body, properties, exchange=None, **_kw) -> None:
        self.out.append((queue, properties.message_id, wire.decode(body), dict(properties.headers or {})))


@pytest.fixture
def capture():
    cap = Capture()
    old = publisher.set_default(cap)
    yield cap
    publisher.set_default(old)


def flow_of(headers: dict[str, Any]) -> dict[str, Any]:
    return wire.loads(headers[workflow.FLOW])


def delivery(headers: dict[str, Any] | None, mid: str, tag: int = 1) -> Delivery:
    header = codec.header_payload(commands.Basic.Properties(message_id=mid, delivery_mode=2, headers=headers), 10)
    d = Delivery(tag, 1, "q", b'{"func":"t","args":[]}', header, False)
    d.task = "t"
    return d


def as_delivery(nxt: workflow.Next, tag: int = 1) -> Delivery:
    d = Delivery(tag, 1, nxt.routing_key, nxt.body, nxt.header, False)
    d.task = wire.decode(nxt.body)[0]
    return d


# -- what send() plans ---------------------------------------------------------------------------------------
def test_a_group_step_is_planned_with_a_gate_holding_the_step_after_it(capture):
    pid = magne.pipeline([add.message(1, 2), magne.group([inc.message(), magne.pipeline([dbl.message(), inc.message()])]),
                          total.message(extra=1)]).send()
    gate_pub, first = capture.out
    gid = pid.removesuffix(".callback")
    assert workflow.CHORD_GROUP.fullmatch(gid) and pid == f"{gid}.callback"
    # the gate, made first: the step after the group, as that group's chord callback (its result is the pipeline's)
    assert gate_pub[0] == chords.gate_queue(gid) and gate_pub[1] == pid and gate_pub[2] == ("nest_total", [], {"extra": 1})
    assert flow_of(gate_pub[3]) == {"chord": gid, "n": 2, "queue": total.queue} and gate_pub[3][workflow.RESULTS]
    # the first step carries the group step, which carries each member's first message and flow
    assert first[:3] == (add.queue, first[1], ("nest_add", [1, 2], {})) and workflow.RESULTS not in first[3]
    flow = flow_of(first[3])
    [group] = flow["rest"]
    assert flow["pipe"] == pid and (group["group"], group["n"]) == (gid, 2)
    m0, m1 = group["members"]
    base = {"group": gid, "n": 2, "pipe": pid, "gate": chords.gate_queue(gid)}
    assert m0["step"]["id"] == f"{gid}.0" and m0["step"]["results"] is True and m0["flow"] == {**base, "i": 0}
    assert m1["step"]["task"] == "nest_dbl" and m1["step"]["results"] is False
    assert m1["flow"]["pipe"] == pid and m1["flow"]["then"] == {**base, "i": 1}
    [last] = m1["flow"]["rest"]
    assert last["task"] == "nest_inc" and last["id"] == f"{gid}.1" and last["results"] is True


def test_a_group_ending_a_pipeline_is_its_result_and_needs_no_gate(capture):
    pid = magne.pipeline([add.message(1, 2), magne.group([inc.message(), dbl.message()])]).send()
    [first] = capture.out
    assert workflow.CHORD_GROUP.fullmatch(pid)
    [group] = flow_of(first[3])["rest"]
    assert group["group"] == pid and all(m["flow"]["collect"] is True and "gate" not in m["flow"]
                                         for m in group["members"])


def test_a_pipeline_starting_with_a_group_publishes_its_members(capture):
    pid = magne.pipeline([magne.group([inc.message(1), dbl.message(2)]), total.message(), inc.message()]).send()
    gate_pub, m0, m1 = capture.out
    assert flow_of(gate_pub[3])["rest"][0]["id"] == pid  # the callback goes on to the last step
    gid = flow_of(gate_pub[3])["chord"]
    assert (m0[1], m1[1]) == (f"{gid}.0", f"{gid}.1") and flow_of(m1[3])["gate"] == chords.gate_queue(gid)


def test_plain_groups_and_chords_keep_todays_headers(capture):
    gid = magne.group([add.message(1, 1)]).send()
    assert capture.out[-1][3] == {workflow.RESULTS: True} and capture.out[-1][1] == f"{gid}.0"
    cid = magne.group([add.message(1, 1)]).then(total.message()).send()
    g = cid.removesuffix(".callback")
    assert flow_of(capture.out[-1][3]) == {"group": g, "i": 0, "n": 1, "gate": chords.gate_queue(g)}
    assert magne.pipeline([add.message(1, 1)]).send() == capture.out[-1][1]
    assert capture.out[-1][3] == {workflow.RESULTS: True}


@pytest.mark.parametrize(("build", "error", "match"), [
    (lambda: magne.group([]), ValueError, "at least one member"),
    (lambda: magne.pipeline([]), ValueError, "at least one step"),
    (lambda: magne.pipeline([magne.group([inc.message()]), magne.group([inc.message()])]), ValueError,
     "steps 1 and 2 .* are both groups"),
    (lambda: magne.pipeline([add.message(1, 1), magne.group([inc.message()]).then(total.message()),
                             magne.group([inc.message()])]), ValueError, None),  # a chord's callback then a group: fine
    (lambda: magne.group([magne.pipeline([inc.message(), magne.group([inc.message()])])]), ValueError,
     "group member 0 is a pipeline holding a group .* not supported"),
    (lambda: magne.group([magne.group([inc.message()])]), TypeError, "got Group"),
    (lambda: magne.pipeline([add.message(1, 1), magne.group([inc.message()]), dbl.message()]), TypeError,
     r"step 3 \(nest_dbl\) follows a group.* plain `def` task"),
    (lambda: magne.pipeline([add.message(1, 1), "x"]), TypeError, "got str"),
])
def test_bad_nesting_is_refused_when_built(build, error, match):
    if match is None:
        build()
        return
    with pytest.raises(error, match=match):
        build()


def test_a_pipeline_given_as_a_step_is_spliced_in():
    p = magne.pipeline([add.message(1, 1), magne.pipeline([inc.message(), dbl.message()])])
    assert [s.task.name for s in p.steps] == ["nest_add", "nest_inc", "nest_dbl"]


# -- what the worker publishes from a nested flow -----------------------------------------------------------
def test_a_worker_publishes_a_group_steps_members_and_member_pipelines_go_on(capture):
    pid = magne.pipeline([add.message(1, 2), magne.group([inc.message(), magne.pipeline([dbl.message(), inc.message()])]),
                          total.message()]).send()
    gid = pid.removesuffix(".callback")
    first = capture.out[-1]
    d = delivery(first[3], first[1])
    workflow.on_success(d, "nest_add", 3)
    m0, m1 = d.follow
    assert wire.decode(m0.body) == ("nest_inc", [3], {}) and m0.message_id == f"{gid}.0"
    assert wire.decode(m1.body) == ("nest_dbl", [3], {})
    d1 = as_delivery(m1)
    workflow.on_success(d1, "nest_dbl", 6)
    [last] = d1.follow
    assert wire.decode(last.body) == ("nest_inc", [6], {}) and last.message_id == f"{gid}.1"
    d2 = as_delivery(last)
    assert chords.member_flow(d2) == {"group": gid, "n": 2, "pipe": pid, "gate": chords.gate_queue(gid), "i": 1}
    # a member pipeline's step that fails: its member, its pipeline and the step after the group all fail
    d1.outcome, d1.reason, d1.error = Outcome.DEAD, "task raised", {"type": "ValueError", "message": "no"}
    ids = [wire.loads(n.body)["id"] for n in workflow.on_dead(d1)]
    assert ids == [pid, f"{gid}.1"]  # the pipeline's id is the group's callback's: recorded once
    m0d = as_delivery(m0)
    m0d.reason = "task raised"
    assert [wire.loads(n.body)["id"] for n in workflow.on_dead(m0d)] == [f"{gid}.0", pid]


def test_a_member_pipeline_of_a_top_level_chord_fails_its_member_and_the_chord(capture):
    cid = magne.group([magne.pipeline([add.message(1, 2), boom.message()]), add.message(1, 1)]).then(
        total.message()).send()
    gid = cid.removesuffix(".callback")
    first = capture.out[-2]
    assert first[1] != f"{gid}.0" and flow_of(first[3])["pipe"] == f"{gid}.0"
    d = delivery(first[3], first[1])
    d.reason = "task raised"
    assert [wire.loads(n.body)["id"] for n in workflow.on_dead(d)] == [f"{gid}.0", cid]


def test_a_step_of_a_nested_flow_is_cancelled_with_its_pipeline_or_group(capture):
    pid = magne.pipeline([add.message(1, 2), magne.group([magne.pipeline([dbl.message(), inc.message()])])]).send()
    d = delivery(capture.out[-1][3], capture.out[-1][1])
    workflow.on_success(d, "nest_add", 3)
    [member] = d.follow
    assert covered(workflow.pipeline_of(as_delivery(member)), {pid: 1})
    gid = magne.group([magne.pipeline([dbl.message(1), inc.message()])]).then(total.message()).send()
    d = delivery(capture.out[-1][3], capture.out[-1][1])
    g = gid.removesuffix(".callback")
    for cancelled in (g, gid, f"{g}.0"):
        assert covered(workflow.pipeline_of(d), {cancelled: 1})
    assert not covered(workflow.pipeline_of(d), {"another": 1})


def test_flow_headers_of_before_nesting_still_work():
    """Messages queued by the version before (a worker upgraded mid-flight): their flows read as they did."""
    rest = [Step(inc, ()).spec("id2", False), Step(total, ()).spec("id3", True)]
    d = delivery({workflow.FLOW: workflow.dumps({"pipe": "id3", "rest": rest}).decode()}, "id1")
    workflow.on_success(d, "nest_add", 3)
    [nxt] = d.follow
    assert wire.loads(codec.decode_properties(nxt.header).headers[workflow.FLOW]) == {"pipe": "id3", "rest": rest[1:]}
    d2 = as_delivery(nxt)
    workflow.on_success(d2, "nest_inc", 4)
    assert codec.decode_properties(d2.follow[0].header).headers == {workflow.RESULTS: True}
    g = f"{workflow.new_id()}.g2"
    old_member = {"group": g, "i": 1, "n": 2, "gate": chords.gate_queue(g)}
    m = delivery({workflow.RESULTS: True, workflow.FLOW: workflow.dumps(old_member).decode()}, f"{g}.1")
    assert chords.member_flow(m) == old_member
    m.reason = "task raised"
    assert [wire.loads(n.body)["id"] for n in workflow.on_dead(m)] == [f"{g}.1", f"{g}.callback"]


@pytest.mark.parametrize("group", [
    {"group": "nope", "n": 1, "members": [{"step": {}, "flow": None}]},
    {"group": "0" * 32 + ".g2", "n": 2, "members": [{"step": Step(inc).spec("a", True), "flow": None}]},  # one short
    {"group": "0" * 32 + ".g1", "n": 1, "members": ["x"]},
    {"group": "0" * 32 + ".g1", "n": 1, "members": [{"step": Step(inc).spec("a", True), "flow": 5}]},
    {"group": "0" * 32 + ".g1", "n": 1, "members": [{"step": {"task": "t", "queue": "amq.x", "id": "a"}}]},
])
def test_a_forged_group_step_becomes_the_pipelines_failure(group):
    d = delivery({workflow.FLOW: workflow.dumps({"pipe": "P", "rest": [group]}).decode()}, "s1")
    workflow.on_success(d, "t", 1)
    recs = [wire.loads(n.body) for n in d.follow]
    assert {r["id"] for r in recs} == {"s1", "P"} and all(r["ok"] is False for r in recs)


# -- magne.testing -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kw", [{"sync": True}, {"threads": 2}])
def test_nested_flows_in_process(kw):
    with testing.worker(**kw) as w:
        assert magne.pipeline([add.message(1, 2), magne.group([inc.message(), dbl.message()]),
                               total.message()]).call() == 10
        pid = magne.pipeline([add.message(1, 2), magne.group([inc.message(), dbl.message()])]).send()
        assert magne.result(pid) == [4, 6] and magne.group_result(pid) == [4, 6]
        assert magne.pipeline([magne.group([inc.message(1), dbl.message(2)]), total.message(), inc.message()]).call() == 7
        assert magne.pipeline([add.message(1, 2), magne.group([magne.pipeline([inc.message(), dbl.message()]),
                                                               dbl.message()]).then(total.message()),
                               inc.message()]).call() == 15
        gid = magne.group([magne.pipeline([add.message(1, 2), dbl.message()]), add.message(1, 1)]).send()
        assert magne.group_result(gid) == [6, 2]
        assert magne.group([magne.pipeline([add.message(1, 2), dbl.message()]), add.message(1, 1)]).then(
            total.message(extra=100)).call() == 108
        with pytest.raises(magne.TaskFailed, match=r"nest_boom .*\.g2\.1\).*boom \[3\]"):
            magne.pipeline([add.message(1, 2), magne.group([inc.message(), boom.message()]), total.message()]).call()
        with pytest.raises(magne.TaskFailed, match=r"nest_boom .*boom \[3\]"):
            magne.group([magne.pipeline([add.message(1, 2), boom.message(), dbl.message()]), add.message(1, 1)]).then(
                total.message()).call()
        with pytest.raises(magne.TaskFailed, match=r"nest_boom .*\.g2\.0\)"):
            magne.pipeline([add.message(1, 2), magne.group([magne.pipeline([inc.message(), boom.message()]),
                                                            dbl.message()])]).call()
        assert len(w.succeeded(total)) == 4  # never after a failed group


def test_a_member_settled_twice_in_process_fires_once():
    flow = LocalFlow()
    gid = f"{workflow.new_id()}.g1"
    gate = chords.gate_queue(gid)
    body = wire.encode("nest_total", [], None, f"{gid}.callback")
    cflow = {"chord": gid, "n": 1, "queue": "Q", "pipe": "P", "rest": [Step(inc).spec("P", True)]}
    assert flow.holds("", gate, body, workflow.header_for(f"{gid}.callback", len(body), False, cflow))
    published: list[tuple[str, bytes, bytes]] = []
    member = {"group": gid, "i": 0, "n": 1, "gate": gate}
    for tag in (1, 2):  # the member ran twice
        d = delivery({workflow.RESULTS: True, workflow.FLOW: workflow.dumps(member).decode()}, f"{gid}.0", tag)
        workflow.on_success(d, "nest_add", 5)
        flow.settled(d, lambda *a: published.append(a))
    [(queue, body, header)] = published
    assert queue == "Q" and wire.decode(body) == ("nest_total", [[5]], {})
    headers = codec.decode_properties(header).headers
    assert workflow.RESULTS not in headers and flow_of(headers) == {"pipe": "P", "rest": cflow["rest"]}


def test_a_member_whose_value_is_not_json_fails_its_group_and_pipeline(capture):
    """A member's value that is not JSON is its failure, and so the failure of every id that waits on it (its
    pipeline's, the step after its group): before, only the member's own record said so and the pipeline waited."""
    pid = magne.pipeline([add.message(1, 2), magne.group([obj.message(), inc.message()]), total.message()]).send()
    gid = pid.removesuffix(".callback")
    d = delivery(capture.out[-1][3], capture.out[-1][1])
    workflow.on_success(d, "nest_add", 3)
    m0 = as_delivery(d.follow[0])
    workflow.on_success(m0, "nest_obj", object())
    recs = [wire.loads(n.body) for n in m0.follow]
    assert [r["id"] for r in recs] == [f"{gid}.0", pid] and not any(r["ok"] for r in recs)
    assert "not JSON serializable" in recs[1]["error"]["message"] and {r["reason"] for r in recs} == {"result not JSON"}
    with testing.worker():
        for flow in (magne.pipeline([add.message(1, 2), magne.group([obj.message(), inc.message()]), total.message()]),
                     magne.pipeline([add.message(1, 2), magne.group([inc.message(), obj.message()])]),
                     magne.group([magne.pipeline([add.message(1, 2), obj.message()])]).then(total.message())):
            with pytest.raises(magne.TaskFailed, match="nest_obj"):
                flow.call(timeout=2)


def test_a_member_whose_value_is_not_json_never_fires_its_chord_in_process():
    flow = LocalFlow()
    gid = f"{workflow.new_id()}.g1"
    gate = chords.gate_queue(gid)
    body = wire.encode("nest_total", [], None, f"{gid}.callback")
    assert flow.holds("", gate, body, workflow.header_for(f"{gid}.callback", len(body), True, {"chord": gid, "n": 1,
                                                                                               "queue": "Q"}))
    member = {"group": gid, "i": 0, "n": 1, "gate": gate}
    d = delivery({workflow.RESULTS: True, workflow.FLOW: workflow.dumps(member).decode()}, f"{gid}.0")
    workflow.on_success(d, "nest_obj", object())
    published: list[Any] = []
    flow.settled(d, lambda *a: published.append(a))  # raised TaskFailed here (reading the failed member's value)
    assert not published and flow.records[f"{gid}.callback"]["ok"] is False and gate in flow.gates
