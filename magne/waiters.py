"""How a sending thread (or an event loop) waits for its messages' outcomes: the waiters magne.publisher hands
the engine. The engine's loop thread calls them (`waiter(msg, error)`), exactly once per message; the sending
thread waits on a Signal (magne.engine.waker) in slices, or its event loop on a future completed through
`call_soon_threadsafe`.
"""

from __future__ import annotations

import asyncio

from magne.amqp.errors import MagneError
from magne.engine.message import Outgoing
from magne.engine.waker import Signal
from magne.outgoing import Failed, raised, reason_of


class One:
    """The waiter of one blocking send: the loop's thread settles it, the sending thread waits on its signal."""

    __slots__ = ("signal", "error", "done")

    def __init__(self) -> None:
        self.signal = Signal()
        self.error: MagneError | None = None
        self.done = False

    def __call__(self, _msg: Outgoing, error: MagneError | None) -> None:
        self.error, self.done = error, True
        self.signal.set()


class Batch:
    """The waiter of a send_many: counts settlements and keeps only the failures (each message's frames go as soon
    as it is settled). The loop's thread writes `settled` and `failed`; the sending thread `need`."""

    __slots__ = ("signal", "settled", "need", "failed")

    def __init__(self) -> None:
        self.signal = Signal()
        self.settled = 0
        self.need = 1
        self.failed: list[Failed] = []

    def __call__(self, msg: Outgoing, error: MagneError | None) -> None:
        if error is not None:
            self.failed.append(Failed(msg.index, msg.message_id or "", reason_of(error), error))
        self.settled += 1
        if self.settled >= self.need:
            self.signal.set()


class Async:
    """The waiter of an asyncio send: completes the loop's future from the engine's thread, thread-safely."""

    __slots__ = ("loop", "future")

    def __init__(self, loop: asyncio.AbstractEventLoop, future: asyncio.Future[str]) -> None:
        self.loop, self.future = loop, future

    def __call__(self, msg: Outgoing, error: MagneError | None) -> None:
        try:
            self.loop.call_soon_threadsafe(complete, self.future, msg.message_id or "", error)
        except RuntimeError:  # the loop is closed: nobody is waiting any more
            pass


def complete(future: asyncio.Future[str], message_id: str, error: MagneError | None) -> None:
    """On the event loop's thread (scheduled by _Async)."""
    if future.done():  # cancelled by the awaiting side
        return
    if error is None:
        future.set_result(message_id)
    else:
        future.set_exception(raised(error))


def wake(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)
