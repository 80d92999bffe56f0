"""magne.tracing against the real broker: one trace from the send, through two retries, to the success."""

from __future__ import annotations

import json

from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode

from magne import hooks, tracing
from magne.publisher import Publisher, Target
from support import runs, wait_for


def test_one_trace_from_send_through_two_retries_to_the_final_success(broker, redis, names, start_worker, tmp_path):
    spans_file = tmp_path / "spans.json"
    queue = f"{names['MAGNE_TEST_PREFIX']}.traced"
    w = start_worker("--threads", "2", modules=("tracing_tasks",), env={"MAGNE_TEST_SPANS": str(spans_file)})
    w.wait_ready()

    provider = TracerProvider()
    exporter = InMemorySpanExporter()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    hook = tracing.install(tracer_provider=provider)
    pub = Publisher()
    try:
        with provider.get_tracer("test").start_as_current_span("web request"):
            mid = pub.send(Target("traced_flaky", queue), ["t1", 2])
        with provider.get_tracer("test").start_as_current_span("another request"):
            pub.send(Target("traced_broken", queue), ["b1"])
    finally:
        pub.close()
        hooks.remove(hook)
    wait_for(lambda: runs(redis, names).get("t1") == 1, 30, what="the task to succeed on its third run")
    wait_for(lambda: broker.ready(f"{queue}.dead") == 1, 30, what="the broken task dead-lettered")
    assert w.stop() == 0

    sent = {s.name: s for s in exporter.get_finished_spans()}
    request, send = sent["web request"], [s for s in exporter.get_finished_spans() if s.name == f"send {queue}"][0]
    assert send.kind is SpanKind.PRODUCER and send.parent.span_id == request.context.span_id
    assert send.attributes["messaging.system"] == "rabbitmq"
    assert send.attributes["messaging.operation.type"] == "send"
    assert send.attributes["messaging.destination.name"] == queue
    assert send.attributes["messaging.message.id"] == mid
    trace_id = f"0x{request.context.trace_id:032x}"
    send_id = f"0x{send.context.span_id:016x}"

    spans = json.loads(spans_file.read_text())
    runs_of_t1 = [s for s in spans if s["name"] == f"process {queue}" and s["context"]["trace_id"] == trace_id]
    assert len(runs_of_t1) == 3, [s["name"] for s in spans]
    runs_of_t1.sort(key=lambda s: s["attributes"]["magne.retries"])
    for i, s in enumerate(runs_of_t1):
        assert s["kind"] == str(SpanKind.CONSUMER)
        assert s["parent_id"] == send_id  # every attempt continues the send's context: one trace
        assert s["attributes"]["magne.retries"] == i
        assert s["attributes"]["messaging.operation.type"] == "process"
        assert s["attributes"]["messaging.message.id"] == mid
        assert s["attributes"]["magne.task"] == "traced_flaky"
    for s in runs_of_t1[:2]:
        assert s["status"]["status_code"] == StatusCode.ERROR.name
        assert s["attributes"]["magne.decision"] == "retry"
        assert s["attributes"]["error.type"] == "RuntimeError"
        assert [e["name"] for e in s["events"]] == ["exception", "retry"]
        assert s["events"][1]["attributes"]["magne.attempt"] == runs_of_t1.index(s) + 1
    last = runs_of_t1[2]
    assert last["status"]["status_code"] == StatusCode.UNSET.name
    assert last["attributes"]["magne.decision"] == "success" and last["events"] == []
    inside = [s for s in spans if s["name"] == "inside the task" and s["context"]["trace_id"] == trace_id]
    assert sorted(s["parent_id"] for s in inside) == sorted(s["context"]["span_id"] for s in runs_of_t1)

    broken = [s for s in spans if s["attributes"].get("magne.task") == "traced_broken"]
    assert len(broken) == 1 and broken[0]["context"]["trace_id"] != trace_id
    assert [e["name"] for e in broken[0]["events"]] == ["exception", "dead_letter"]
    assert broken[0]["attributes"]["magne.decision"] == "dead"
