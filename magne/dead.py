"""`magne dead list|replay|purge QUEUE`: dead letters you can act on."""

from __future__ import annotations

import datetime
from collections import deque
from typing import Any

from pamqp import commands

from magne import topology
from magne.amqp.connection import Connection
from magne.amqp.frames import decode_properties
from magne.amqp.url import parse_url, resolve_url

CH = 1


def _names(queue: str) -> tuple[str, str]:
    """(task queue, dead-letter queue) from either name."""
    if queue.endswith(".dead"):
        return queue[: -len(".dead")], queue
    return queue, topology.dead_queue(queue)


def _connect(url: str | None) -> Connection:
    conn = Connection(parse_url(resolve_url(url)), "magne dead", heartbeat=0)
    conn.connect()
    conn.open_channel(CH)
    return conn


def _count(conn: Connection, queue: str) -> int:
    return conn.rpc(CH, commands.Queue.Declare(queue=queue, passive=True), commands.Queue.DeclareOk).message_count


def _get(conn: Connection, queue: str) -> tuple[int, commands.Basic.Properties, bytes] | None:
    """basic.get without ack: (delivery tag, properties, body), or None when the queue is empty."""
    conn.send(CH, commands.Basic.Get(queue=queue, no_ack=False))
    # get-ok carries content, so the decoder hands it over complete in `contents`;
    # get-empty is a plain method frame.
    while not conn.contents:
        for i, (_, frame) in enumerate(conn.inbox):
            if isinstance(frame, commands.Basic.GetEmpty):
                del conn.inbox[i]
                return None
        conn.pump(30)
    _, method, header, body = conn.contents.popleft()
    return method.delivery_tag, decode_properties(header), body


def describe(props: commands.Basic.Properties, body: bytes) -> dict[str, Any]:
    h = props.headers or {}
    reason = h.get("x-magne-reason")
    if reason is None and h.get("x-death"):
        # Dead-lettered by the broker itself (a quorum queue's delivery limit, say).
        reason = f"broker: {h['x-death'][0].get('reason')}"
    history = h.get("x-magne-history") or []
    last_at = history[-1].get("at") if history and isinstance(history[-1], dict) else None
    return {
        "message_id": props.message_id,
        "task": h.get("x-magne-task"),
        "reason": reason,
        "error": f"{h.get('x-magne-error-type')}: {h.get('x-magne-error-message')}" if h.get("x-magne-error-type") else None,
        "attempts": len(history) or None,
        "failed_at": datetime.datetime.fromtimestamp(last_at).isoformat(timespec="seconds") if last_at else None,
        "body": body[:200].decode("utf-8", "replace"),
    }


def dead_list(url: str | None, queue: str, newest: int = 5, scan: int = 100_000) -> list[str]:
    """Count, then the newest few dead letters. Reads without acking; closing the channel puts them all back."""
    _, dq = _names(queue)
    conn = _connect(url)
    try:
        n = _count(conn, dq)
        lines = [f"{dq}: {n} dead letters"]
        last: deque[dict[str, Any]] = deque(maxlen=newest)
        for _ in range(min(n, scan)):
            got = _get(conn, dq)
            if got is None:
                break
            last.append(describe(got[1], got[2]))
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
        conn.close()  # unacked gets go back to the queue in order


def dead_replay(url: str | None, queue: str, limit: int | None = None) -> int:
    """Move dead letters back to their task queue: each one confirmed there before it leaves the dead queue."""
    task_queue, dq = _names(queue)
    conn = _connect(url)
    try:
        conn.rpc(CH, commands.Confirm.Select(), commands.Confirm.SelectOk)
        n = _count(conn, dq) if limit is None else limit
        moved = 0
        for _ in range(n):
            got = _get(conn, dq)
            if got is None:
                break
            tag, props, body = got
            headers = dict(props.headers or {})
            target = headers.get("x-magne-queue") or task_queue
            # A fresh start: no retry count, no failure; the history stays for the record.
            for key in [k for k in headers if k.startswith("x-magne-") and k != "x-magne-history"]:
                del headers[key]
            headers.pop("x-death", None)
            props.headers = headers or None
            conn.publish(CH, "", target, body, props, mandatory=True)
            reply = conn.wait(CH, commands.Basic.Ack, commands.Basic.Nack)
            if isinstance(reply, commands.Basic.Nack) or conn.contents:
                raise RuntimeError(f"broker did not take the replayed message for {target}; it stays in {dq}")
            conn.send(CH, commands.Basic.Ack(tag, False))
            moved += 1
        return moved
    finally:
        conn.close()


def dead_purge(url: str | None, queue: str) -> int:
    _, dq = _names(queue)
    conn = _connect(url)
    try:
        return conn.rpc(CH, commands.Queue.Purge(queue=dq), commands.Queue.PurgeOk).message_count
    finally:
        conn.close()
