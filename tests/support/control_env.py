"""Per-test names for the fleet's streams and control exchange (magne.cancels, magne.events, magne.control), set for
the test's own process and, through `names`, for the workers it starts; deleted with the test's queues."""

from __future__ import annotations

from typing import Any


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
