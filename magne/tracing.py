"""OpenTelemetry tracing, built on magne.hooks: `pip install 'magne[otel]'`, then `magne.tracing.install()`.

Call `install()` once per process, where your code configures OpenTelemetry (or pass a
`tracer_provider`); in the task module is simplest, since both the worker and the code that
sends import it. Then:

- every send (`task.send`, `send_with_options`, `send_many`, `send_async`) makes a PRODUCER span
  `send <queue>` and injects its context into the message's headers (W3C `traceparent`, and
  `tracestate` when there is one). The span is a child of whatever span is current in the
  sender (a web request, say), and marks the moment the message was made: it ends before the
  broker's confirm, which the hook does not see.
- every run of a task makes a CONSUMER span `process <queue>` that continues that context (its
  parent is the send span) and is current while the task runs, so spans your task makes nest
  under it. A failure records the exception and sets the span's status to ERROR; the decision
  is an event on the span: `retry` (attempt, delay, reason) or `dead_letter` (reason). Retry
  copies keep the original headers, so every attempt of a message is a child of the same send
  span: one trace from the send through every retry to the final outcome.

Attributes follow OpenTelemetry's messaging semantic conventions (messaging.system "rabbitmq",
messaging.operation.type "send"/"process", messaging.operation.name, messaging.destination.name:
the task queue, which is also the name of its exchange, messaging.rabbitmq.destination.routing_key,
messaging.message.id, error.type) plus magne's own (magne.task, magne.retries, magne.decision).

Threads: the send hook runs on the sending thread, the task hooks on the pool thread that runs
the task (magne.hooks); OpenTelemetry's context is per thread, so attaching it there is exactly
what makes the task's own spans nest. This module is the example to copy for other tracers.
"""

from __future__ import annotations

from typing import Any

from opentelemetry import context as otel_context
from opentelemetry import propagate, trace
from opentelemetry.trace import SpanKind, Status, StatusCode

from magne import __version__, hooks

SYSTEM = "rabbitmq"


class Tracing(hooks.Hook):
    """The tracing hook. `tracer_provider`: None for the global one (opentelemetry.trace.set_tracer_provider)."""

    def __init__(self, tracer_provider: trace.TracerProvider | None = None) -> None:
        self.tracer = trace.get_tracer("magne", __version__, tracer_provider=tracer_provider)

    # -- the sending thread ------------------------------------------------------------------
    def before_send(self, message: hooks.Outgoing) -> None:
        attrs = {
            "messaging.system": SYSTEM,
            "messaging.operation.type": "send",
            "messaging.operation.name": "send",
            "messaging.destination.name": message.queue,
            "messaging.rabbitmq.destination.routing_key": message.queue,
            "messaging.message.id": message.message_id,
            "magne.task": message.task_name,
        }
        with self.tracer.start_as_current_span(f"send {message.queue}", kind=SpanKind.PRODUCER, attributes=attrs):
            propagate.inject(message.headers)

    # -- the pool thread -------------------------------------------------------------------------
    def _start(self, run: hooks.TaskRun) -> tuple[trace.Span, object]:
        headers = {k: v for k, v in run.headers.items() if isinstance(v, str)}
        parent = propagate.extract(headers)
        attrs: dict[str, Any] = {
            "messaging.system": SYSTEM,
            "messaging.operation.type": "process",
            "messaging.operation.name": "process",
            "messaging.destination.name": run.queue,
            "messaging.rabbitmq.destination.routing_key": run.queue,
            "magne.task": run.task_name,
            "magne.retries": run.retries,
        }
        if run.message_id:
            attrs["messaging.message.id"] = run.message_id
        if run.redelivered:
            attrs["magne.redelivered"] = True
        span = self.tracer.start_span(f"process {run.queue}", context=parent, kind=SpanKind.CONSUMER, attributes=attrs)
        token = otel_context.attach(trace.set_span_in_context(span))
        return span, token

    def before_task(self, run: hooks.TaskRun) -> None:
        run.state[self] = self._start(run)

    def after_success(self, run: hooks.TaskRun) -> None:
        entry = run.state.pop(self, None)
        if entry is None:
            return
        span, token = entry
        span.set_attribute("magne.decision", "success")
        _end(span, token)

    def after_failure(self, run: hooks.TaskRun) -> None:
        entry = run.state.pop(self, None)
        if entry is None:  # it never started (a bad message): a span for its decision all the same
            entry = self._start(run)
        span, token = entry
        exc = run.exception
        decision = run.decision
        span.set_attribute("magne.decision", decision)
        if exc is not None:
            span.record_exception(exc)
            span.set_attribute("error.type", type(exc).__qualname__)
        span.set_status(Status(StatusCode.ERROR, f"{run.reason}: {type(exc).__name__ if exc else ''}".rstrip(": ")))
        if decision == "retry":
            span.add_event("retry", {"magne.attempt": run.retries + 1, "magne.retry.delay_s": run.delay,
                                     "magne.reason": run.reason})
        elif decision == "dead":
            span.add_event("dead_letter", {"magne.reason": run.reason, "magne.attempt": run.retries + 1})
        elif decision == "requeue":
            span.add_event("requeue", {"magne.reason": "cold shutdown"})
        _end(span, token)


def _end(span: trace.Span, token: object) -> None:
    try:
        otel_context.detach(token)  # type: ignore[arg-type]
    finally:
        span.end()


def install(tracer_provider: trace.TracerProvider | None = None) -> Tracing:
    """Register the tracing hook (magne.hooks.add) and return it; `magne.hooks.remove(it)` undoes it."""
    return hooks.add(Tracing(tracer_provider))  # type: ignore[return-value]
