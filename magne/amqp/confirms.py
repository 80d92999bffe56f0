"""The one confirm tracker: what a channel in confirm mode has published and not yet had confirmed.

Every confirmed publish of magne (an application's send, a worker's retry or dead-letter copy,
anything a feature publishes) is numbered here and settled here, exactly once, by its own
number: a `basic.ack` or `basic.nack` (single or `multiple`), or a `basic.return` matched to
its message. It is the only module that reads basic.ack/basic.nack/basic.return of a
publishing channel (magne.engine.sender feeds it the frames).

Returns: RabbitMQ sends a mandatory message's `basic.return` just before the ack that covers
it, but the frame carries no sequence number, and an ack may be `multiple`. So a return is
held until an ack covers a publish it matches, and matched there, among the publishes that ack covers, to the oldest
one with the same exchange, routing key, message id and body (by its hash). Two messages with all four
equal are interchangeable; a publish that was routed is never failed for another's return.

After the channel or connection is gone, `lost()` hands back what was unconfirmed, in order:
the broker may have taken any of it (the publisher decides what to publish again).

Pure: no socket, no thread, no clock; owned by the thread of the loop that drives the channel.
Operations are O(1) per publish (a multiple ack walks the order deque from the front).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from typing import Any

from pamqp import commands

from magne.amqp.errors import PublishError


class Nacked(PublishError):
    """The broker refused the message (basic.nack): a reject-publish queue at its length limit, an internal error."""

    reason = "nack"


class Returned(PublishError):
    """The message was unroutable (basic.return of a mandatory publish): no queue is bound for its routing key."""

    reason = "return"

    def __init__(self, text: str, reply_code: int = 312, reply_text: str = "NO_ROUTE") -> None:
        super().__init__(text)
        self.reply_code = reply_code
        self.reply_text = reply_text


# (exchange, routing key, message id, hash of the body): what a basic.return is matched on. The body's hash, not
# the body: a message waiting for its confirm keeps only its encoded frames (one copy of the body, not two).
Key = tuple[str, str, str | None, int]
Settled = list[tuple[Any, PublishError | None]]


class Tracker:
    __slots__ = ("seq", "_pending", "_order", "_returns")

    def __init__(self) -> None:
        self.seq = 0  # the last number given (the broker numbers a channel's publishes the same way, from 1)
        self._pending: dict[int, tuple[Any, Key | None]] = {}  # seq -> (token, key)
        self._order: deque[int] = deque()  # seqs in publish order (some already settled singly)
        self._returns: list[Any] = []  # basic.return frames waiting for the ack that covers their publish

    def __len__(self) -> int:
        return len(self._pending)

    def add(self, token: Any, key: Key | None = None) -> int:
        """Number the next publish. `key` lets a basic.return find it (None: it is never mandatory)."""
        self.seq += 1
        self._pending[self.seq] = (token, key)
        self._order.append(self.seq)
        return self.seq

    def returned(self, method: commands.Basic.Return, message_id: str | None, body: bytes) -> None:
        """A basic.return arrived (its publish's ack follows)."""
        self._returns.append((method, (method.exchange, method.routing_key, message_id, hash(body))))

    def confirm(self, frame: commands.Basic.Ack | commands.Basic.Nack) -> Settled:
        """Settle what a basic.ack or basic.nack covers: [(token, None if confirmed else why not)], in order."""
        tag, pending, order = frame.delivery_tag, self._pending, self._order
        covered: list[int] = []
        if frame.multiple:
            while order and order[0] <= tag:
                seq = order.popleft()
                if seq in pending:
                    covered.append(seq)
        elif tag in pending:
            covered.append(tag)
        returned = self._match_returns(covered) if self._returns else {}
        nack = isinstance(frame, commands.Basic.Nack)
        out: Settled = []
        for seq in covered:
            token, key = pending.pop(seq)
            ret = returned.get(seq)
            where = repr(key[1]) if key else "its routing key"
            if ret is not None:
                out.append((token, Returned(f"message for {where} was unroutable: {ret.reply_code} {ret.reply_text}",
                                            ret.reply_code, ret.reply_text)))
            elif nack:
                out.append((token, Nacked(f"broker refused the message for {where} (basic.nack)")))
            else:
                out.append((token, None))
        while order and order[0] not in pending:  # keep the deque as short as the window
            order.popleft()
        return out

    def _match_returns(self, covered: list[int]) -> dict[int, Any]:
        matched: dict[int, Any] = {}
        left = []
        for method, key in self._returns:
            for seq in covered:
                if seq not in matched and self._pending[seq][1] == key:
                    matched[seq] = method
                    break
            else:
                left.append((method, key))
        if left:
            # AMQP only says a return comes before the ack of its publish: an ack of others may come in between. Keep
            # a return while a publish it may belong to still waits (never more of them than publishes waiting).
            now_covered = set(covered)
            waiting = {k for seq, (_t, k) in self._pending.items() if seq not in now_covered}
            left = [r for r in left if r[1] in waiting][: len(self._pending)]
        self._returns = left
        return matched

    def oldest(self) -> Any:
        """The token of the oldest unconfirmed publish (None when there is none)."""
        for seq in self._order:
            got = self._pending.get(seq)
            if got is not None:
                return got[0]
        return None

    def drop_oldest_while(self, pred: Callable[[Any], bool]) -> list[Any]:
        """Take out, oldest first, the unconfirmed tokens for which `pred` holds, stopping at the first that does
        not (a publisher gives up on overdue ones; a late ack for them then settles nothing)."""
        out = []
        order, pending = self._order, self._pending
        while order:
            got = pending.get(order[0])
            if got is None:
                order.popleft()
                continue
            if not pred(got[0]):
                break
            del pending[order.popleft()]
            out.append(got[0])
        return out

    def lost(self) -> list[Any]:
        """The channel is gone: every unconfirmed token, in publish order; numbering starts again at 1."""
        tokens = [t for t, _k in self._pending.values()]
        self._pending.clear()
        self._order.clear()
        self._returns = []
        self.seq = 0
        return tokens
