"""The name a worker gives its broker connections: what it consumes, bounded.

An operator reads it in the management UI and `rabbitmqctl list_connections`
("magne worker [EMAILS, REPORTS] pid=4711"). It travels in Connection.StartOk's
client properties, before the connection's frame size is negotiated, when RabbitMQ
takes frames of at most 4096 bytes: a worker of about 260 queues sent a longer
frame and its login failed with 403. So the list is cut: the first queues that fit
in MAX_CONNECTION_NAME bytes, then "and N more".
"""

from __future__ import annotations

MAX_CONNECTION_NAME = 512  # bytes of UTF-8; the client properties then stay far below RabbitMQ's 4096-byte frame


def connection_name(role: str, queues: list[str], limit: int = MAX_CONNECTION_NAME) -> str:
    """`role [Q1, Q2, ...]`, or `role [Q1, Q2, and N more]` when the whole list would pass `limit` bytes of UTF-8.
    Never longer than `limit`, never cut inside a character. Called by the I/O thread's owner when it names the
    consuming and the publishing connection (magne/io/loop.py)."""
    full = f"{role} [{', '.join(queues)}]"
    if len(full.encode("utf-8")) <= limit:
        return full
    shown: list[str] = []
    for i, q in enumerate(queues):
        candidate = f"{role} [{', '.join([*shown, q])}, and {len(queues) - i - 1} more]"
        if len(candidate.encode("utf-8")) > limit:
            break
        shown.append(q)
    listed = "".join(f"{q}, " for q in shown)
    return _cut(f"{role} [{listed}and {len(queues) - len(shown)} more]", limit)


def _cut(text: str, limit: int) -> str:
    """`text` cut to at most `limit` bytes of UTF-8, on a character boundary."""
    data = text.encode("utf-8")
    return text if len(data) <= limit else data[:limit].decode("utf-8", "ignore")


def consumer_tag(queue: str, pid: int, generation: int, seq: int) -> str:
    """`magne.<queue>.<pid>.<generation>.<seq>`, with the queue part cut so that the tag stays a short string (255
    bytes of UTF-8: a queue name may take 238). Unique by its numbers; the queue is there for an operator's eyes.
    Called by the I/O thread (magne/io/consumer.py) for each basic.consume."""
    tail = f".{pid}.{generation}.{seq}"
    return f"magne.{_cut(queue, 255 - len('magne.') - len(tail))}{tail}"
