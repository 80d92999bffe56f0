"""Per-test names for the fleet's streams and control exchange (magne.cancels, magne.events, magne.control, and
magne.results), set for
the test's own process and, through `names`, for the workers it starts; deleted with the test's queues."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

from magne import workflow


def isolate(names: dict[str, str], broker: Any, monkeypatch: Any) -> dict[str, str]:
    prefix = names["MAGNE_TEST_PREFIX"]
    for var, suffix in (("MAGNE_CANCEL_STREAM", "cancels"), ("MAGNE_CONTROL_EXCHANGE", "control"),
                        ("MAGNE_EVENTS_STREAM", "events")):
        names[var] = f"{prefix}.{suffix}"
        monkeypatch.setenv(var, names[var])
    broker.exchanges.add(names["MAGNE_CONTROL_EXCHANGE"])
    broker.track(f"{prefix}.async")
    names["async"] = f"{prefix}.async"
    return names


@contextlib.contextmanager
def own_results_stream(names: dict[str, str], broker: Any) -> Iterator[str]:
    """This test's own results stream (`<prefix>.results`, deleted with its queues) for this process, and its name in
    `names` for the workers it starts; magne.workflow's stream and retention are restored after."""
    stream = f"{names['MAGNE_TEST_PREFIX']}.results"
    old_stream, old_age = workflow.STREAM, workflow.MAX_AGE
    workflow.configure(stream=stream)
    names["MAGNE_RESULTS_STREAM"] = stream
    broker.track(stream)
    try:
        yield stream
    finally:
        workflow.configure(stream=old_stream, max_age=old_age)
