"""Reading results: `magne.result(message_id)`, `result_async`, and what `task.call` waits with.

Results live in one RabbitMQ stream, `magne.results` (magne.workflow writes them; docs/results.md). A process
reads it through its default publisher's engine Client (no connection of its own): one shared *follower* (a
stream consumer) feeds every waiting call of the process. A waiter is registered by message id, on the client's
loop thread, and the calling thread waits on its Signal (in slices: it stays interruptible); nothing polls the
broker. A follower starts at the stream offset of the message's send time (read from ids made by
magne.workflow.new_id, minus a minute for clocks that differ), or at the stream's first record for any other id,
and then follows new records for as long as the process lives. A waiter for an older message than the shared
follower covers gets a catch-up follower of its own, cancelled once nobody waits on it.

Records seen are kept in a bounded cache (the first record of an id wins: a message run twice may have two), so
a second read in the same process answers at once. State: the waiters and the cache, bounded by CACHE.
"""

from __future__ import annotations

import asyncio
import sys
import time
from typing import Any

from magne import workflow
from magne.errors import ResultTimeout, TaskFailed
from magne.followers import SLICE, Follower, Reader, Waiter, reader
from magne.publisher import Publisher, default_publisher


def outcome(record: dict[str, Any]) -> Any:
    """A record's value, or TaskFailed for a failure."""
    if record.get("ok") is True:
        return record.get("value")
    err = record.get("error") if isinstance(record.get("error"), dict) else {}
    return _raise(TaskFailed(str(record.get("of") or record.get("id")), str(record.get("task", "")),
                             str(record.get("reason", "")), str(err.get("type", "Error")), str(err.get("message", "")),
                             str(err.get("traceback", ""))))


def _raise(exc: BaseException) -> Any:
    raise exc


def result(message_id: str, timeout: float = 30.0, publisher: Publisher | None = None) -> Any:
    """The return value of the message `message_id` (sent with results=True), once its outcome is final. Raises
    TaskFailed if it failed for good, ResultTimeout if no outcome arrived within `timeout` seconds. Any thread;
    waits interruptibly, without polling the broker. Under magne.testing, asks the in-process worker. `publisher`:
    read through its connection (default: the process's default publisher)."""
    pub = publisher or default_publisher()
    if not isinstance(pub, Publisher):  # magne.testing's worker stands in for the publisher
        rec = pub.result_record(message_id, timeout)
        if rec is None:
            raise ResultTimeout(f"no result for message {message_id} (did it ask for one, with results=True?)")
        return outcome(rec)
    deadline = time.monotonic() + timeout
    r = reader(pub)
    w, f = r.waiter(message_id)
    return wait(r, w, f, deadline, timeout)


def expect(message_id: str) -> tuple[Reader, Waiter, Follower] | None:
    """Register for a result before its message is sent (task.call): then a follower never needs to look back for
    it. None under magne.testing (result() asks the in-process worker)."""
    pub = default_publisher()
    if not isinstance(pub, Publisher):
        return None
    r = reader(pub)
    return (r, *r.waiter(message_id, fresh=True))


def wait(r: Reader, w: Waiter, f: Follower, deadline: float, timeout: float) -> Any:
    """Wait for a registered waiter's record until `deadline` (monotonic), then forget it; its outcome."""
    try:
        while not w.signal.wait(min(SLICE, max(0.0, deadline - time.monotonic()))):
            if time.monotonic() >= deadline:
                raise ResultTimeout(f"no result for message {w.mid} within {timeout:g}s (still queued, running or "
                                    "retrying, no worker consumes its queue, or it did not ask with results=True)")
            if f.lost:  # its consumer is gone (refused after a reconnect): read on through another
                f = r.refollow(w, f)
    finally:
        r.done(w, f)
    assert w.record is not None
    return outcome(w.record)


async def result_async(message_id: str, timeout: float = 30.0, publisher: Publisher | None = None) -> Any:
    """`await magne.result_async(id)`: result() without blocking the event loop (the follower completes a future;
    starting a follower, a blocking broker call, runs in the loop's default executor)."""
    pub = publisher or default_publisher()
    if not isinstance(pub, Publisher):
        return await asyncio.get_running_loop().run_in_executor(None, result, message_id, timeout)
    loop = asyncio.get_running_loop()
    r = reader(pub)
    future: asyncio.Future[dict[str, Any]] = loop.create_future()
    registering = loop.run_in_executor(None, r.waiter, message_id, loop, future)
    try:
        w, f = await asyncio.shield(registering)
    except asyncio.CancelledError:  # the caller gave up while a follower started: forget the waiter once it is made
        registering.add_done_callback(lambda made: _forget_later(loop, r, made))
        raise
    try:
        rec = await asyncio.wait_for(future, timeout)
    except TimeoutError:
        raise ResultTimeout(f"no result for message {message_id} within {timeout:g}s") from None
    finally:
        await loop.run_in_executor(None, r.done, w, f)
    return outcome(rec)


def group_result(group_id: str, timeout: float = 30.0, publisher: Publisher | None = None) -> list[Any]:
    """The members' values in order, once every member's outcome is final. TaskFailed for the first failed member (in
    member order), ResultTimeout if not every outcome arrived within `timeout` seconds. Any thread."""
    m = workflow.CHORD_GROUP.fullmatch(group_id)
    if m is None:
        raise ValueError(f"{group_id[:60]!r} is not a group id (magne.group(...).send() returns one)")
    deadline = time.monotonic() + timeout
    return [result(f"{group_id}.{i}", max(0.0, deadline - time.monotonic()), publisher) for i in range(int(m.group(1)))]


def _forget_later(loop: asyncio.AbstractEventLoop, r: Reader, made: asyncio.Future[tuple[Waiter, Follower]]) -> None:
    """The event loop's thread: a registration whose caller was cancelled finished; forget it (on an executor
    thread: done() may wait for the broker), else its waiter, and a catch-up follower, would stay forever."""
    if not made.cancelled() and made.exception() is None:
        try:
            loop.run_in_executor(None, r.done, *made.result())
        except RuntimeError:  # the loop (or its executor) shut down: done() on this thread then
            r.done(*made.result())


def print_result(message_id: str, url: str | None, timeout: float) -> int:
    """`magne result ID`: the outcome as one JSON object on stdout; exit 0 for a value, 1 for a failure or none yet."""
    pub = Publisher(url)
    try:
        try:  # a group's id (magne.group(...).send()) has no record of its own: its members' values, in order
            grouped = workflow.CHORD_GROUP.fullmatch(message_id) is not None
            value = group_result(message_id, timeout, pub) if grouped else result(message_id, timeout, publisher=pub)
        except TaskFailed as exc:
            print(workflow.dumps({"id": message_id, "ok": False, "task": exc.task, "reason": exc.reason,
                                   "error": {"type": exc.error_type, "message": exc.error_message,
                                             "traceback": exc.traceback}}).decode())
            return 1
        except ResultTimeout:
            print(f"magne result: no outcome of message {message_id} yet (or it did not ask for one, or it is older "
                  "than the results stream keeps)", file=sys.stderr)
            return 1
        print(workflow.dumps({"id": message_id, "ok": True, "value": value}).decode())
        return 0
    finally:
        pub.close()
