"""Pipelines (and the steps they are made of): tasks that run one after another, each getting the previous
step's return value as its last positional argument. The application's half; the worker's is magne.workflow.

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

from magne import results, wire, workflow
from magne.publisher import TaskLike, default_publisher


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
