"""`magne dead list|replay|purge QUEUE`: dead letters you can act on.

Everything shown comes from a publisher or a failed task, so it is shown safely:
values escaped and cut (magne.logs.clean), bodies as a preview with their size,
and headers of unexpected shapes shown as far as they can be.
"""

from __future__ import annotations

import datetime
from collections import deque
from typing import Any

from pamqp import commands

from magne import topology, wire
from magne.amqp import names, properties
from magne.amqp.codec import decode_properties
from magne.amqp.errors import AMQPError, ChannelClosed, PublishError
from magne.amqp.url import Nodes, parse_urls
from magne.engine.client import Client
from magne.errors import ConfigError
from magne.logs import clean

BODY_PREVIEW = 200


def _names(queue: str) -> tuple[str, str]:
    """(task queue, dead-letter queue) from either name."""
    if queue.endswith(".dead"):
        return queue[: -len(".dead")], queue
    if queue.endswith(".XQ"):  # dramatiq's dead letters (magne --accept dramatiq dead-letters there too)
        return queue[: -len(".XQ")], queue
    return queue, topology.dead_queue(queue)


def _client(url: str | None) -> Client:
    """A client on the first node of the list that answers (a cluster: any node will do)."""
    nodes = Nodes(parse_urls(url))
    while True:
        client = Client(Nodes([nodes.current], start=0), "magne dead")
        try:
            return client.open()
        except AMQPError as exc:
            client.close(1.0)
            if exc.permanent or nodes.failed():
                raise


def _count(client: Client, dq: str) -> int:
    try:
        return client.queue_counts(dq)[0]
    except ChannelClosed as exc:
        if exc.code != 404:
            raise
        raise ConfigError(f"there is no dead-letter queue {dq!r}: queue names are case-sensitive (task `add` uses "
                          "queue ADD unless it names another one)") from None


def preview(body: bytes, limit: int = BODY_PREVIEW) -> str:
    """A body as it is safe to print: decoded where it is text, escaped, cut, with its size."""
    text = body[:limit].decode("utf-8", "backslashreplace")
    more = "..." if len(body) > limit else ""
    return f"{clean(text, limit + 20)}{more} ({len(body)} bytes)"


def describe(props: commands.Basic.Properties, body: bytes) -> dict[str, Any]:
    h = props.headers if isinstance(props.headers, dict) else {}
    reason = h.get(wire.REASON)
    death = h.get("x-death")
    if reason is None and isinstance(death, list) and death and isinstance(death[0], dict):
        # Dead-lettered by the broker itself (a quorum queue's delivery limit, say).
        reason = f"broker: {death[0].get('reason')}"
    history = h.get(wire.HISTORY)
    history = history if isinstance(history, list) else []
    last = history[-1] if history and isinstance(history[-1], dict) else {}
    at = last.get("at")
    failed_at = None
    if type(at) is int and 0 <= at < 2**40:
        failed_at = datetime.datetime.fromtimestamp(at).isoformat(timespec="seconds")
    etype = h.get(wire.ERROR_TYPE)
    mid = _message_id(props, h, body)
    return {
        "message_id": clean(mid, 80) if mid else None,
        "task": clean(h.get(wire.TASK), 100) if h.get(wire.TASK) is not None else None,
        "reason": clean(reason, 100) if reason is not None else None,
        "error": f"{clean(etype, 100)}: {clean(h.get(wire.ERROR_MESSAGE), 300)}" if etype else None,
        "attempts": len(history) or None,
        "failed_at": failed_at,
        "body": preview(body),
    }


def _message_id(props: commands.Basic.Properties, h: dict[str, Any], body: bytes) -> str | None:
    """The message's id: its property, else a celery message's (header `id`, or correlation_id) or a dramatiq
    message's (`message_id` in its JSON body), as the worker logged it (magne.formats)."""
    for mid in (props.message_id, h.get("id"), props.correlation_id):
        if isinstance(mid, str) and mid:
            return mid
    if body[:1] == b"{" and b'"message_id"' in body:
        try:
            mid = wire.loads(body).get("message_id")
        except Exception:
            return None
        return mid if isinstance(mid, str) and mid else None
    return None


def dead_list(url: str | None, queue: str, newest: int = 5, scan: int = 100_000) -> list[str]:
    """Count, then the newest few dead letters. Reads without acking; closing the channel puts them all back."""
    _, dq = _names(queue)
    client = _client(url)
    try:
        n = _count(client, dq)
        lines = [f"{dq}: {n} dead letters"]
        last: deque[dict[str, Any]] = deque(maxlen=newest)
        for _ in range(min(n, scan)):
            got = client.get(dq)
            if got is None:
                break
            try:
                props = decode_properties(got[1])
            except Exception:
                props = commands.Basic.Properties()
            last.append(describe(props, got[2]))
        if last:
            lines.append(f"newest {len(last)}:")
        for d in reversed(last):
            lines.append(f"- {d['message_id'] or '(no id)'} task={d['task']} reason={d['reason']!r} "
                         f"attempts={d['attempts']} failed_at={d['failed_at']}")
            if d["error"]:
                lines.append(f"    {d['error']}")
            lines.append(f"    body: {d['body']}")
        return lines
    finally:
        client.close()  # unacked gets go back to the queue in order


def dead_replay(url: str | None, queue: str, limit: int | None = None) -> int:
    """Move dead letters back to their task queue: each one confirmed there before it leaves the dead queue.

    The target is always the queue this dead-letter queue belongs to, never a header's
    say-so: a publisher could otherwise route a replay anywhere.
    """
    task_queue, dq = _names(queue)
    client = _client(url)
    try:
        n = _count(client, dq) if limit is None else limit
        moved = 0
        for _ in range(n):
            got = client.get(dq)
            if got is None:
                break
            tag, header, body = got
            # A fresh start: no retry count, no failure, no broker death record; the history stays for the record.
            fresh = properties.splice(header, {}, lambda k: (wire.is_magne_header(k) and k != wire.HISTORY)
                                      or k == "x-death", delivery_mode=None)
            try:
                client.publish_confirmed("", task_queue, body, fresh)
            except PublishError as exc:
                raise PublishError(f"broker did not take the replayed message for {task_queue} ({exc}); "
                                   f"it stays in {dq}") from None
            client.ack(tag)
            moved += 1
        return moved
    finally:
        client.close()


def dead_purge(url: str | None, queue: str) -> int:
    _, dq = _names(queue)
    client = _client(url)
    try:
        return client.rpc(names.QueuePurge(queue=dq), commands.Queue.PurgeOk).message_count
    finally:
        client.close()
