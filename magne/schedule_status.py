"""`magne status`'s section on periodic tasks: each schedule, whether a worker leads it and which one last
sent a tick, and its next due times.

Read over AMQP on the command's own Client: a passive declare of each schedule's lock queue
(magne.leader: 405 RESOURCE_LOCKED means a worker's connection holds it, 404 that none does), and the
tail of the schedule stream (the last tick of each schedule and the `host/pid` that sent it). Reading
the tail writes one small marker message into the stream (magne.leader.last_ticks).
"""

from __future__ import annotations

import datetime as dt
from typing import Any

from pamqp import commands

from magne.amqp import names
from magne.amqp.errors import ChannelClosed, MagneError
from magne.amqp.url import Nodes, parse_urls
from magne.engine.client import Client
from magne.leader import MAX_LOOKBACK, REDECLARE, RESOURCE_LOCKED, last_ticks, lock_name
from magne.schedule import UTC

SHOW_NEXT = 3


def gather(url: str | list[str] | None, tasks: list[Any], stream: str) -> list[dict[str, Any]]:
    """One dict per scheduled task (JSON-ready). The command's main thread."""
    now = dt.datetime.now(UTC)
    client = Client(Nodes(parse_urls(url)), "magne status (schedules)")
    try:
        held = {t.name: _held(client, lock_name(stream, t.name)) for t in tasks}
        leaders: dict[str, str] = {}  # host/pid of each schedule's latest checkpoint (a leader writes one a minute)
        try:
            back = max(max(2 * t.schedule.period(now) + 60.0, 2 * REDECLARE) for t in tasks)
            last = last_ticks(client, stream, now - dt.timedelta(seconds=min(back, MAX_LOOKBACK)), checkpoints=False,
                              leaders=leaders)
            why = ""
        except ChannelClosed as exc:  # no stream yet: no worker ever led
            last, why = {}, "no tick recorded" if exc.code == 404 else str(exc)
        except MagneError as exc:
            last, why = {}, str(exc)
    finally:
        client.close(2.0)
    out = []
    for t in tasks:
        nxt, due = [], now
        for _ in range(SHOW_NEXT):
            due = t.schedule.next_after(due)
            nxt.append(due.isoformat(timespec="seconds"))
        tick = last.get(t.name)
        out.append({"task": t.name, "queue": t.queue, "schedule": t.schedule.describe(), "led": held[t.name],
                    "leader": leaders.get(t.name) if held[t.name] else None,
                    "last_tick": tick[0].isoformat() if tick else None, "last_sent_by": tick[1] if tick else None,
                    "next": nxt, "note": why})
    return out


def _held(client: Client, lock: str) -> bool | None:
    """True: a worker holds the lock; False: none does; None: cannot tell."""
    try:
        client.call(names.QueueDeclare(queue=lock, passive=True), commands.Queue.DeclareOk)
    except ChannelClosed as exc:
        return True if exc.code == RESOURCE_LOCKED else False if exc.code == 404 else None
    return None  # our own connection cannot hold it: a queue by that name that is not exclusive


def render(schedules: list[dict[str, Any]]) -> list[str]:
    if not schedules:
        return []
    lines = ["", "schedules:"]
    for s in schedules:
        led = {True: "led", False: "NO LEADER", None: "leader unknown"}[s["led"]]
        led += f" by {s['leader']}" if s.get("leader") else ""
        last = (f"last tick {s['last_tick']} sent by {s['last_sent_by']}" if s["last_tick"]
                else s["note"] or "no tick in the stream's recent tail")
        lines.append(f"  {s['task']} ({s['schedule']}, queue {s['queue']}): {led}; {last}; next {', '.join(s['next'])}")
    return lines
