"""What a worker consumes, and how: which queues, of which type and kind, with which prefetch, consumer timeout
and priority. Worked out once from the registered tasks by the worker's main thread (magne.worker), before the
I/O thread starts; a disagreement between tasks on one queue is a ConfigError then, not a 406 later.
"""

from __future__ import annotations

from magne.errors import ConfigError
from magne.registry import Task, queues_of


def select_queues(tasks: dict[str, Task], wanted: list[str] | None) -> list[str]:
    known = queues_of(tasks)
    if not wanted:
        return known
    unknown = [q for q in wanted if q not in known]
    if unknown:
        raise ConfigError(f"no registered task uses queue(s) {', '.join(unknown)}; known queues: {', '.join(known)}")
    return list(dict.fromkeys(wanted))


def queue_types(tasks: dict[str, Task], queues: list[str], default: str) -> dict[str, str]:
    """Each consumed queue's type: its tasks' queue_type, else the worker's --queue-type."""
    types: dict[str, str] = {}
    for t in tasks.values():
        if t.queue not in queues:
            continue
        qt = t.queue_type or default
        if types.setdefault(t.queue, qt) != qt:
            raise ConfigError(f"tasks on queue {t.queue} disagree on its queue_type ({types[t.queue]} vs {qt})")
    for q in queues:
        types.setdefault(q, default)
    return types


CONSUMER_TIMEOUT_MARGIN = 60.0  # seconds above the longest time limit (plus --lost-after) of a queue's tasks


def consumer_timeouts(tasks: dict[str, Task], queues: list[str], time_limit: float, lost_after: float) -> dict[str, int]:
    """Each queue's x-consumer-timeout (ms): the broker must not cut a delivery that a time limit has not."""
    out: dict[str, int] = {}
    for q in queues:
        longest = max((t.time_limit or time_limit for t in tasks.values() if t.queue == q), default=time_limit)
        out[q] = int((longest + lost_after + CONSUMER_TIMEOUT_MARGIN) * 1000)
    return out


def async_prefetch(concurrency: int) -> int:
    """An async-only queue's prefetch: its concurrency plus a quarter, so that a finished run's place is taken by a
    message already here rather than one a round trip away, without hoarding what other processes could run."""
    return min(65535, concurrency + max(1, concurrency // 4))


def queue_kinds(tasks: dict[str, Task], queues: list[str]) -> dict[str, str]:
    """Each consumed queue's kind: "sync" (thread tasks only), "async" (`async def` only) or "mixed"."""
    kinds: dict[str, set[bool]] = {q: set() for q in queues}
    for t in tasks.values():
        if t.queue in kinds:
            kinds[t.queue].add(t.is_async)
    return {q: "mixed" if len(k) == 2 else "async" if k == {True} else "sync" for q, k in kinds.items()}


def max_priorities(tasks: dict[str, Task], queues: list[str]) -> dict[str, int]:
    """x-max-priority of each consumed queue whose tasks ask for one (@task(max_priority=N)); they must agree."""
    out: dict[str, int] = {}
    for t in tasks.values():
        if t.queue in queues and t.max_priority:
            if out.setdefault(t.queue, t.max_priority) != t.max_priority:
                raise ConfigError(f"tasks on queue {t.queue} disagree on max_priority ({out[t.queue]} vs {t.max_priority})")
    return out
