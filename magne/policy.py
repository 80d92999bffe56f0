"""What happens to a message whose task did not succeed: the retry and dead-letter policy.

`decide()` is pure: given the delivery, what went wrong and the task's policy, it
says retry-with-delay (and prepares the copy for the delay queue) or dead-letter
(and prepares the copy for `<queue>.dead`). The pool runs tasks and calls it on a
failure; the I/O thread only writes what it prepared. Nothing here touches a
socket or a lock.
"""

from __future__ import annotations

import dataclasses
import random
import time
import traceback
from typing import Any

from pamqp import commands

from magne import topology, wire
from magne.amqp import codec
from magne.delivery import Delivery, Outcome
from magne.errors import TimeLimitExceeded


@dataclasses.dataclass(frozen=True)
class RetryPolicy:
    max_retries: int = 0
    min_backoff: float = 1.0
    max_backoff: float = 300.0
    # None: any Exception the task raises, and time limits. Otherwise only these types
    # (list TimeLimitExceeded here to retry time limits too).
    retry_on: tuple[type[BaseException], ...] | None = None

    def __post_init__(self) -> None:
        if self.max_retries < 0:
            raise ValueError("max_retries must be >= 0")
        if not 0 < self.min_backoff <= self.max_backoff:
            raise ValueError("backoff needs 0 < min_backoff <= max_backoff")
        if self.max_backoff > topology.MAX_DELAY:
            raise ValueError(f"max_backoff must be at most {topology.MAX_DELAY:g}s (about "
                             f"{topology.MAX_DELAY / 86400:.0f} days: RabbitMQ's longest message TTL and queue expiry)")

    def should_retry(self, exc: BaseException, retries_done: int) -> bool:
        if retries_done >= self.max_retries:
            return False
        if self.retry_on is None:
            return isinstance(exc, Exception | TimeLimitExceeded)
        return isinstance(exc, self.retry_on)

    def backoff(self, retries_done: int) -> float:
        """Exponential with equal jitter, never below min_backoff nor above max_backoff: the n-th retry (n from 0)
        waits between half and all of min * 2^(n+1), so the first waits between min and 2 x min. With
        min = max every retry waits exactly that. (The delay queue then rounds it up: topology.delay_ms.)"""
        ceiling = min(self.max_backoff, self.min_backoff * 2 ** min(retries_done + 1, 64))
        return random.uniform(max(self.min_backoff, ceiling / 2), ceiling)


@dataclasses.dataclass(frozen=True)
class Failure:
    """What went wrong with one run. `retryable=False` for messages that can never run (bad body, arguments)."""

    reason: str  # "bad message", "wrong arguments", "task raised", "time limit", "body too large"
    exc: BaseException
    retryable: bool = True

    def error(self, with_traceback: bool) -> dict[str, str]:
        err = {"type": wire.safe_text(type(self.exc).__name__, 200), "message": wire.safe_text(self.exc, wire.MESSAGE_CHARS)}
        if with_traceback:
            try:
                tb = "".join(traceback.format_exception(self.exc))
            except Exception:
                tb = "<the traceback could not be formatted>"
            err["traceback"] = wire.safe_text(tb[-wire.TRACEBACK_CHARS :], wire.TRACEBACK_CHARS)
        return err


def decide(d: Delivery, failure: Failure, policy: RetryPolicy | None, frame_max: int,
           queue_type: str = "classic", now: float | None = None) -> list[str]:
    """Fill in `d`'s outcome and its copy; returns warnings about its headers (for the log)."""
    state = wire.read_state(d.header)
    meta = d.meta  # a foreign message (magne.formats.Foreign): its retries spent count, its home and dead queues
    if meta is not None:
        state.retries = max(state.retries, meta.retries)
    home = meta.home if meta is not None else d.queue
    error = failure.error(with_traceback=failure.retryable)
    d.reason = failure.reason
    d.error = error
    entry = {"attempt": state.retries + 1, "reason": failure.reason, "error-type": error["type"],
             "error-message": error["message"][: wire.HISTORY_MESSAGE_CHARS], "at": int(now or time.time())}
    history = [*state.history[-(wire.HISTORY_KEEP - 1):], entry]
    add: dict[str, Any]
    if failure.retryable and policy is not None and policy.should_retry(failure.exc, state.retries):
        d.outcome = Outcome.RETRY
        d.delay = policy.backoff(state.retries)
        ms = topology.delay_ms(d.delay)
        d.copy_to = topology.delay_queue(home, ms)
        d.copy_declare = topology.declare_delay(home, ms, queue_type)
        add = {wire.RETRIES: state.retries + 1, wire.HISTORY: history}
    else:
        d.outcome = Outcome.DEAD
        d.copy_to = topology.dead_queue(d.queue)
        d.copy_declare = topology.dead_declaration(d.queue, queue_type)[0]
        if meta is not None and meta.dead_to:  # where that framework's users look (dramatiq: <queue>.XQ)
            d.copy_to, d.copy_declare = meta.dead_to, meta.dead_declare
        add = {wire.REASON: failure.reason, wire.QUEUE: d.queue, wire.TASK: d.task, wire.RETRIES: state.retries,
               wire.ERROR_TYPE: error["type"], wire.ERROR_MESSAGE: error["message"]}
        if "traceback" in error:
            add[wire.ERROR_TRACEBACK] = error["traceback"]
        add[wire.HISTORY] = history
    d.copy_header = wire.copy_header(d.header, add, frame_max)
    return state.warnings


def dead_letter_plainly(d: Delivery, failure: Failure, why: str) -> None:
    """The fallback when decide() itself failed: dead-letter with magne's headers only, so nothing is lost."""
    d.outcome = Outcome.DEAD
    d.reason = failure.reason
    d.copy_to = getattr(d.meta, "dead_to", None) or topology.dead_queue(d.queue)  # dramatiq's: its .XQ
    d.copy_declare = None
    d.copy_header = codec.header_payload(commands.Basic.Properties(delivery_mode=2, headers={
        wire.REASON: failure.reason, wire.QUEUE: d.queue, wire.TASK: wire.safe_text(d.task, 200),
        wire.ERROR_TYPE: wire.safe_text(type(failure.exc).__name__, 200), wire.ERROR_MESSAGE: wire.safe_text(failure.exc, 512),
        wire.DROPPED: wire.safe_text(why, 512)}), len(d.body))
