"""Tasks for the tracing test: the worker side records its spans with the SDK's in-memory exporter and writes
them to MAGNE_TEST_SPANS (JSON) when the worker stops, through an on_worker_stop hook."""

import json
import os
from pathlib import Path

import redis
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from magne import hooks, task, tracing

PREFIX = os.environ["MAGNE_TEST_PREFIX"]
KEY = os.environ["MAGNE_TEST_KEY"]
r = redis.Redis(host="127.0.0.1", port=6379)

exporter = InMemorySpanExporter()
provider = TracerProvider()
provider.add_span_processor(SimpleSpanProcessor(exporter))
tracing.install(tracer_provider=provider)
tracer = provider.get_tracer("tracing_tasks")


@task(queue=f"{PREFIX}.traced", max_retries=3, min_backoff=0.05, max_backoff=0.1)
def traced_flaky(n, failures=2):
    with tracer.start_as_current_span("inside the task"):  # nests under the process span
        attempt = r.hincrby(f"{PREFIX}:attempts", str(n), 1)
        if attempt <= failures:
            raise RuntimeError(f"attempt {attempt} of {n} fails on purpose")
        r.hincrby(KEY, str(n), 1)


@task(queue=f"{PREFIX}.traced")
def traced_broken(n):
    raise ValueError(f"{n} is broken")


class DumpSpans(hooks.Hook):
    def on_worker_stop(self, worker):
        spans = [json.loads(s.to_json()) for s in exporter.get_finished_spans()]
        Path(os.environ["MAGNE_TEST_SPANS"]).write_text(json.dumps(spans))


hooks.add(DumpSpans())
