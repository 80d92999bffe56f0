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


class Pipeline:
    """Steps to run one after another. `send()` returns the pipeline's id (for magne.result)."""

    def __init__(self, steps: Iterable[Step]) -> None:
        self.steps = list(steps)
        if not self.steps:
            raise ValueError("a pipeline needs at least one step")
        for s in self.steps:
            if not isinstance(s, Step):
                raise TypeError(f"a pipeline's steps are task.message(...) steps, got {type(s).__name__}")

    def send(self) -> str:
        """Publish the first step, carrying the rest; returns the pipeline's id (its last step's message id)."""
        ids = [workflow.new_id() for _ in self.steps]
        rest = [s.spec(i, n == len(self.steps) - 1) for n, (s, i) in enumerate(zip(self.steps, ids, strict=True))][1:]
        headers: dict[str, Any] = {wire.RESULTS_HEADER: True} if not rest else {}
        if rest:
            headers[wire.FLOW_HEADER] = workflow.dumps({"pipe": ids[-1], "rest": rest}).decode()
        self.steps[0].send(ids[0], headers)
        return ids[-1]

    def call(self, timeout: float = 30.0) -> Any:
        """Send and wait for the pipeline's result (magne.result)."""
        return results.result(self.send(), timeout)


def pipeline(steps: Iterable[Step]) -> Pipeline:
    """`magne.pipeline([a.message(...), b.message(...), ...]).send()`: the pipeline's id."""
    return Pipeline(steps)


GATE_EXPIRES_MS = 7 * 86_400_000  # a chord's gate is deleted after a week unused (a chord that never completed)


class Group:
    """Members that run in parallel. `send()` returns the group's id (for magne.group_result); `then(step)` makes it
    a chord."""

    def __init__(self, members: Iterable[Step]) -> None:
        self.members = list(members)
        for m in self.members:
            if not isinstance(m, Step):
                raise TypeError(f"a group's members are task.message(...) steps, got {type(m).__name__}")
        if not self.members:
            raise ValueError("a group needs at least one member")

    def then(self, callback: Step) -> Chord:
        """A chord: `callback` runs once after every member succeeded, with their values (a list) appended."""
        return Chord(self, callback)

    def send(self) -> str:
        gid = f"{workflow.new_id()}.g{len(self.members)}"
        self._publish(gid, None)
        return gid

    def _publish(self, gid: str, gate: str | None) -> None:
        """Every member, pipelined and confirmed; PublishError if any was not taken."""
        n, pub = len(self.members), default_publisher()
        headers = [{wire.RESULTS_HEADER: True} for _ in range(n)]
        if gate is not None:
            for i, h in enumerate(headers):
                h[wire.FLOW_HEADER] = workflow.dumps({"group": gid, "i": i, "n": n, "gate": gate}).decode()
        if not isinstance(pub, Publisher):  # magne.testing's in-process worker
            for i, (m, h) in enumerate(zip(self.members, headers, strict=True)):
                m.send(f"{gid}.{i}", h)
            return
        msgs = []
        for i, (m, h) in enumerate(zip(self.members, headers, strict=True)):
            body = wire.encode(m.task.name, m.args, m.kwargs or None, f"{gid}.{i}")
            props = wire.properties_for(f"{gid}.{i}")
            props.headers = h
            msgs.append(Message(m.task.queue, body, props, queue_type=m.task.queue_type))
        pub.publish_many(msgs).raise_on_failure()


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
        body = wire.encode(cb.task.name, cb.args, cb.kwargs or None, cid)
        flow = {"chord": gid, "n": n, "queue": cb.task.queue}
        props = wire.properties_for(cid)
        props.headers = {wire.RESULTS_HEADER: True, wire.FLOW_HEADER: workflow.dumps(flow).decode()}
        pub = default_publisher()
        if isinstance(pub, Publisher):
            client = pub._running()
            for method, reply in topology.declarations(cb.task.queue, cb.task.queue_type or pub.queue_type):
                client.call(method, reply)
            client.call(names.QueueDeclare(queue=gate, durable=True, arguments={
                "x-queue-type": "quorum", "x-dead-letter-exchange": "", "x-dead-letter-routing-key": cb.task.queue,
                **topology.AT_LEAST_ONCE, "x-expires": GATE_EXPIRES_MS}), commands.Queue.DeclareOk)
        pub.publish(gate, body, props, exchange="")
        self.group._publish(gid, gate)
        return cid

    def call(self, timeout: float = 30.0) -> Any:
        """Send and wait for the callback's result (magne.result)."""
        return results.result(self.send(), timeout)


def group(members: Iterable[Step]) -> Group:
    """`magne.group([t.message(...) for ...]).send()`: the group's id; `.then(step).send()`: a chord's id."""
    return Group(members)


group_result = results.group_result  # `magne.group_result(id)`: the members' values in order
