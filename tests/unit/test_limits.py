"""magne.limits without a broker: which policy RabbitMQ applies to a queue, and what counts as a drop-head limit."""

from __future__ import annotations

from magne.limits import _limited, effective

POLICIES = [
    {"name": "low", "pattern": "^jobs", "apply-to": "queues", "priority": 0, "definition": {"max-length": 10}},
    {"name": "high", "pattern": "^jobs\\.a$", "apply-to": "all", "priority": 5,
     "definition": {"max-length": 5, "overflow": "drop-head"}},
    {"name": "exchanges", "pattern": ".*", "apply-to": "exchanges", "priority": 99, "definition": {}},
    {"name": "broken", "pattern": "(", "priority": 100, "definition": {}},
]


def test_the_highest_priority_matching_queue_policy_applies():
    assert effective(POLICIES, "jobs.a")["name"] == "high"
    assert effective(POLICIES, "jobs.b")["name"] == "low"
    assert effective(POLICIES, "other") is None  # the exchanges-only policy and a bad pattern never apply


def test_drop_head_needs_a_length_limit():
    assert _limited({"max-length": 5, "overflow": "drop-head"})
    assert _limited({"max-length-bytes": 5, "overflow": "drop-head"})
    assert not _limited({"overflow": "drop-head"})
    assert not _limited({"max-length": 5, "overflow": "reject-publish"})
    assert _limited({"max-length": 5})  # drop-head is RabbitMQ's default overflow
    assert _limited({"x-max-length": 1, "x-overflow": "drop-head"}, "x-")
