"""A blocking way to drive magne's connection for the bench's bare reference loops (not magne's own code path).

The ceilings (bench/bare.py, publish.bare_publish) are built from magne's protocol pieces with no engine
loop around them, so that what magne loses against them is its own overhead.
"""

from __future__ import annotations

import select
import time
from typing import Any

from pamqp import commands

from magne.amqp.url import Params
from magne.engine.connection import READ, WRITE, Connection, State


def step(conn: Connection, wait: float) -> None:
    now = time.monotonic()
    conn.flush(now)
    conn.tick(now)
    ev, fd = conn.events(), conn.fileno()
    r, w, _ = select.select([fd] if ev & READ else [], [fd] if ev & WRITE else [], [], wait)
    now = time.monotonic()
    if w:
        conn.on_writable(now)
    if r:
        conn.on_readable(now)


def rpc(conn: Connection, method: Any, reply: type, channel: int = 1, timeout: float = 30.0) -> Any:
    got: list[Any] = []
    conn.call(channel, method, (reply,), got.append)
    deadline = time.monotonic() + timeout
    while not got:
        if time.monotonic() > deadline:
            raise TimeoutError(f"no {reply.__name__}")
        step(conn, 0.2)
    return got[0]


def open_blocking(params: Params, name: str, confirms: bool = False) -> Connection:
    """A connection with channel 1 open (in confirm mode if asked), driven by select on this thread."""
    conn = Connection(params, name)
    conn.start(time.monotonic())
    deadline = time.monotonic() + 30
    while conn.state is not State.OPEN:
        if time.monotonic() > deadline:
            raise TimeoutError("the connection did not open")
        step(conn, 0.2)
    rpc(conn, commands.Channel.Open(), commands.Channel.OpenOk)
    if confirms:
        rpc(conn, commands.Confirm.Select(), commands.Confirm.SelectOk)
    return conn
