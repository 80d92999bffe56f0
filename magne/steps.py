"""Pipelines, groups and chords (and the steps they are made of). The application's half; the worker's is
magne.workflow (and magne.chords).

A pipeline's tasks run one after another, each getting the previous step's return value as its last positional
argument. A group's members run in parallel; `magne.group_result(id)` lists their values in order. A chord is a
group with a callback (`group([...]).then(step)`) that runs once, after every member succeeded, with the list of
their values as its last positional argument.

`magne.pipeline([add.message(1, 2), add.message(10), mul.message(3)]).send()` publishes the first step only,
with the rest of the pipeline in its `x-magne-flow` header; the worker that runs a step publishes the next one
(confirmed) before it acks the step, so a crash between the two duplicates a step, never loses the pipeline. The
id `send()` returns is the last step's message id, and every step knows it: the pipeline's result is the last
step's value, or the first failure (a failing step stops the pipeline and its failure is recorded under that id).

Nesting (docs/results.md): a pipeline's step may be a group (or a chord), and a group's member a pipeline of task
steps. `send()` plans the whole flow at once: every id, every header, and one chord gate per group that a step
follows (the step after a group is that group's chord callback, so it is published once, as a chord's is). A group
that ends a pipeline has no gate: the member that completes it records the list under the pipeline's id (its
group id). Deeper nesting is refused here, naming what is wrong, never found out by a worker.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from typing import Any

from pamqp import commands

from magne import chords, results, topology, wire, workflow
from magne.amqp import names
from magne.outgoing import Message
from magne.publisher import Publisher, TaskLike, default_publisher


@dataclasses.dataclass(frozen=True)
class Step:
    """A task with arguments, not sent yet (`task.message(*args, **kwargs)`)."""

    task: TaskLike
    args: tuple[Any, ...] = ()
    kwargs: dict[str, Any] = dataclasses.field(default_factory=dict)

    def spec(self, mid: str, results: bool) -> dict[str, Any]:
        """The step as a flow header carries it (docs/results.md)."""
        return {"task": self.task.name, "queue": self.task.queue, "qt": self.task.queue_type, "args": list(self.args),
                "kwargs": self.kwargs, "id": mid, "results": results}

    def send(self, message_id: str | None = None, headers: dict[str, Any] | None = None) -> str:
        """Publish this step (confirmed) with magne's `headers`; its message id."""
        return default_publisher().send(self.task, self.args, self.kwargs or None,
                                        message_id=message_id or workflow.new_id(), headers=headers)


Start = tuple[dict[str, Any], dict[str, Any] | None]  # a message to publish: its step spec and its flow (or None)


class Pipeline:
    """Steps to run one after another: task steps, groups and chords (a pipeline given as a step is spliced in).
    `send()` returns the pipeline's id (for magne.result)."""

    def __init__(self, steps: Iterable[Step | Group | Chord | Pipeline]) -> None:
        self.steps: list[Step | Group | Chord] = []
        for s in steps:
            if isinstance(s, Pipeline):
                self.steps.extend(s.steps)
            elif isinstance(s, Step | Group | Chord):
                self.steps.append(s)
            else:
                raise TypeError(f"a pipeline's steps are task.message(...) steps, groups or chords, got {type(s).__name__}")
        if not self.steps:
            raise ValueError("a pipeline needs at least one step")
        nodes: list[Step | Group] = []  # a chord is its group followed by its callback
        for s in self.steps:
            nodes.extend((s.group, s.callback) if isinstance(s, Chord) else (s,))
        for k, (a, b) in enumerate(zip(nodes, nodes[1:], strict=False)):
            if isinstance(a, Group) and isinstance(b, Group):
                raise ValueError(f"pipeline steps {k + 1} and {k + 2} (counting from 1, a chord as its group and its "
                                 "callback) are both groups: a group must be followed by a task step (which gets the "
                                 "list of its values) or end the pipeline")
            if isinstance(a, Group) and getattr(b.task, "is_async", False):
                raise TypeError(f"pipeline step {k + 2} ({b.task.name}) follows a group, so it is that group's chord "
                                "callback and must be a plain `def` task (it reads the members' values before it runs)")
        self.nodes = nodes

    def send(self) -> str:
        """Make the gates of its groups, publish its first step (or its first group's members), carrying the rest;
        returns the pipeline's id (its last step's message id, or its last group's id)."""
        plan = _Plan(self.nodes)
        for gate, step, mid, flow, asked in plan.gates:
            _make_gate(gate, step, mid, flow, asked)
        first = self.nodes[0]
        if isinstance(first, Step):  # as task.send: with the task's own options (its priority)
            first.send(plan.ids[0], _headers(*plan.starts[0]))
        else:
            _publish(plan.starts)
        return plan.ids[-1]

    def call(self, timeout: float = 30.0) -> Any:
        """Send and wait for the pipeline's result (magne.result)."""
        return results.result(self.send(), timeout)


def pipeline(steps: Iterable[Step | Group | Chord | Pipeline]) -> Pipeline:
    """`magne.pipeline([a.message(...), magne.group([...]), b.message(...)]).send()`: the pipeline's id."""
    return Pipeline(steps)


class _Plan:
    """A pipeline's messages, worked out before anything is sent: `starts` (published now), `gates` (made first: a
    group's member may complete it at once) and `ids` (per node; the last is the pipeline's)."""

    def __init__(self, nodes: list[Step | Group]) -> None:
        self.nodes, self.last = nodes, len(nodes) - 1
        self.ids = [f"{workflow.new_id()}.g{len(n.members)}" if isinstance(n, Group) else workflow.new_id() for n in nodes]
        for k in range(1, len(nodes)):
            if isinstance(nodes[k - 1], Group):  # a group's follower is its chord callback: named so (magne.cancels)
                self.ids[k] = f"{self.ids[k - 1]}.callback"
        self.gates: list[tuple[str, Step, str, dict[str, Any], bool]] = []
        first = nodes[0]
        if isinstance(first, Step):
            self.starts = [(first.spec(self.ids[0], self.last == 0), self.flow(0, {}))]
        else:
            self.starts = [(m["step"], m["flow"]) for m in self.spec(0)["members"]]

    def flow(self, k: int, flow: dict[str, Any]) -> dict[str, Any] | None:
        """The flow of node k's message (a step): what runs after it, up to and including the next group."""
        rest = []
        for j in range(k + 1, len(self.nodes)):
            rest.append(self.spec(j))
            if isinstance(self.nodes[j], Group):
                break
        if rest:
            flow = {**flow, "pipe": self.ids[-1], "rest": rest}
        return flow or None

    def spec(self, k: int) -> dict[str, Any]:
        node, mid = self.nodes[k], self.ids[k]
        if isinstance(node, Step):
            return node.spec(mid, k == self.last)
        n = len(node.members)
        base: dict[str, Any] = {"group": mid, "n": n, "pipe": self.ids[-1]}
        if k == self.last:
            base["collect"] = True  # its members' list is the pipeline's result, recorded by the member completing it
        else:  # the next step waits in this group's gate, as a chord's callback
            cb = self.nodes[k + 1]
            assert isinstance(cb, Step)
            base["gate"] = gate = chords.gate_queue(mid)
            self.gates.append((gate, cb, self.ids[k + 1], self.flow(k + 1, {"chord": mid, "n": n, "queue": cb.task.queue}),
                               k + 1 == self.last))
        return {"group": mid, "n": n, "members": [{"step": s, "flow": f} for s, f in node.starts(mid, base)]}


GATE_EXPIRES_MS = 7 * 86_400_000  # a chord's gate is deleted after a week unused (a chord that never completed)


class Group:
    """Members that run in parallel: task steps, or pipelines of task steps. `send()` returns the group's id (for
    magne.group_result); `then(step)` makes it a chord."""

    def __init__(self, members: Iterable[Step | Pipeline]) -> None:
        self.members = list(members)
        for i, m in enumerate(self.members):
            if isinstance(m, Pipeline):
                if not all(isinstance(s, Step) for s in m.steps):
                    raise ValueError(f"group member {i} is a pipeline holding a group or chord: a member pipeline may "
                                     "hold only task steps (nesting deeper than pipeline > group > pipeline > step "
                                     "is not supported)")
            elif not isinstance(m, Step):
                raise TypeError(f"a group's members are task.message(...) steps or pipelines of them, got "
                                f"{type(m).__name__}")
        if not self.members:
            raise ValueError("a group needs at least one member")

    def then(self, callback: Step) -> Chord:
        """A chord: `callback` runs once after every member succeeded, with their values (a list) appended."""
        return Chord(self, callback)

    def send(self) -> str:
        gid = f"{workflow.new_id()}.g{len(self.members)}"
        _publish(self.starts(gid, None))
        return gid

    def starts(self, gid: str, base: dict[str, Any] | None) -> list[Start]:
        """Each member's first message. Member i's value is recorded as `<gid>.<i>` (a pipeline member's last step has
        that id); `base`: the group's part of a member's flow (its gate, its pipeline), None for a plain group."""
        out: list[Start] = []
        for i, m in enumerate(self.members):
            mine = {**base, "i": i} if base else None
            steps = m.steps if isinstance(m, Pipeline) else [m]
            ids = [*(workflow.new_id() for _ in steps[1:]), f"{gid}.{i}"]
            specs = [s.spec(mid, mid == ids[-1]) for s, mid in zip(steps, ids, strict=True)]
            if len(specs) == 1:
                out.append((specs[0], mine))
                continue
            flow: dict[str, Any] = {"pipe": (base or {}).get("pipe") or ids[-1], "rest": specs[1:]}
            if mine:
                flow["then"] = mine  # the flow its last step carries: the member's place in its group
            out.append((specs[0], flow))
        return out


class Chord:
    """A group and its callback. `send()` returns the chord's id: its callback's message id (for magne.result)."""

    def __init__(self, group: Group, callback: Step) -> None:
        if not isinstance(callback, Step):
            raise TypeError(f"a chord's callback is a task.message(...) step, got {type(callback).__name__}")
        if getattr(callback.task, "is_async", False):
            raise TypeError("a chord's callback must be a plain `def` task (it reads the members' values before it runs)")
        self.group, self.callback = group, callback

    def send(self) -> str:
        """Make the chord's gate holding the callback (magne.chords), then publish the members."""
        n = len(self.group.members)
        gid = f"{workflow.new_id()}.g{n}"
        cid, gate, cb = f"{gid}.callback", chords.gate_queue(gid), self.callback
        _make_gate(gate, cb, cid, {"chord": gid, "n": n, "queue": cb.task.queue}, True)
        _publish(self.group.starts(gid, {"group": gid, "n": n, "gate": gate}))
        return cid

    def call(self, timeout: float = 30.0) -> Any:
        """Send and wait for the callback's result (magne.result)."""
        return results.result(self.send(), timeout)


def _make_gate(gate: str, cb: Step, mid: str, flow: dict[str, Any] | None, asked: bool) -> None:
    """A chord's gate (magne.chords): a quorum queue holding the callback `cb`, dead-lettering into its task queue."""
    body = wire.encode(cb.task.name, cb.args, cb.kwargs or None, mid)
    props = wire.properties_for(mid)
    props.headers = {wire.FLOW_HEADER: workflow.dumps(flow).decode()} if flow else {}
    if asked:
        props.headers[wire.RESULTS_HEADER] = True
    pub = default_publisher()
    if isinstance(pub, Publisher):
        client = pub._running()
        for method, reply in topology.declarations(cb.task.queue, cb.task.queue_type or pub.queue_type):
            client.call(method, reply)
        client.call(names.QueueDeclare(queue=gate, durable=True, arguments={
            "x-queue-type": "quorum", "x-dead-letter-exchange": "", "x-dead-letter-routing-key": cb.task.queue,
            **topology.AT_LEAST_ONCE, "x-expires": GATE_EXPIRES_MS}), commands.Queue.DeclareOk)
    pub.publish(gate, body, props, exchange="")


def _headers(spec: dict[str, Any], flow: dict[str, Any] | None) -> dict[str, Any]:
    """magne's headers of a flow's message: whether it records its result, what runs after it."""
    headers: dict[str, Any] = {wire.RESULTS_HEADER: True} if spec["results"] else {}
    if flow:
        headers[wire.FLOW_HEADER] = workflow.dumps(flow).decode()
    return headers


def _publish(starts: list[Start]) -> None:
    """The first messages of a flow, pipelined and confirmed; PublishError if any was not taken."""
    msgs = []
    for spec, flow in starts:
        mid = spec["id"]
        body = wire.encode(spec["task"], spec["args"], spec["kwargs"] or None, mid)
        props = wire.properties_for(mid)
        props.headers = _headers(spec, flow)
        msgs.append(Message(spec["queue"], body, props, queue_type=spec["qt"]))
    pub = default_publisher()
    if not isinstance(pub, Publisher):  # magne.testing's in-process worker
        for m in msgs:
            pub.publish(m.queue, m.body, m.properties, queue_type=m.queue_type)
        return
    pub.publish_many(msgs).raise_on_failure()


def group(members: Iterable[Step | Pipeline]) -> Group:
    """`magne.group([t.message(...) for ...]).send()`: the group's id; `.then(step).send()`: a chord's id. A member
    may be a pipeline of task steps: its value is its last step's."""
    return Group(members)


group_result = results.group_result  # `magne.group_result(id)`: the members' values in order
