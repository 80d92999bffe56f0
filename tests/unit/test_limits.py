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


def test_a_reject_publish_limit_is_warned_on_the_due_queue_only(monkeypatch):
    """A full task queue no longer loses what falls due (it falls due into `<queue>.due`): a reject-publish limit
    is worth a warning only where it covers the due queue, and the warning names the task queue it serves."""
    import logging

    from magne import limits, logs

    limited = {"jobs", "jobs.due"}
    monkeypatch.setattr(limits, "check", lambda _params, queues: [(q, "reject-publish", "policy p") for q in queues
                                                                  if q in limited])
    seen: list[logging.LogRecord] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            seen.append(record)

    handler = Keep()
    logging.getLogger("magne").addHandler(handler)
    try:
        limits.warn(None, ["jobs", "other"], {"jobs": "classic"})  # type: ignore[arg-type]
        logs.flush(2.0)
    finally:
        logging.getLogger("magne").removeHandler(handler)
    said = [r.getMessage() for r in seen if r.levelno == logging.WARNING]
    assert len(said) == 1 and said[0].startswith("queue jobs.due, where the delayed messages and retry copies of queue "
                                                 "jobs fall due"), said
