"""Settlement: outcomes back from the pool become frames on the consuming channel.

Runs on the I/O thread only. Acks go through the eager coalescer (magne.acks);
requeues are written here and only here (`_requeue`: the frame, the coalescer's
note that the tag is settled, the count). A retry or dead letter is a copy to
publish on the link first; its original is acked only once the broker confirmed
the copy, so a crash in between can duplicate but never lose.

Copies the link cannot take yet wait in `unsent`. When the link fails, the copies it
had not confirmed go back to the front of `unsent`, and the oldest one is blamed
(the broker processes frames in order, so a copy it refuses by closing the link is
the oldest unconfirmed one). A blamed copy is then published alone, so it cannot
hold up the others; twice blamed, it goes without its declare and with its headers
cut to magne's own; after MAX_BLAME its original is requeued and the failure logged.
"""

from __future__ import annotations

import time
from collections import deque

from pamqp import commands

from magne import logs, wire
from magne.acks import AckCoalescer
from magne.amqp import codec, properties
from magne.amqp.errors import ChannelClosed, ConnectionClosed
from magne.amqp.outbox import Outbox
from magne.backoff import Backoff
from magne.delivery import Delivery, Outcome
from magne.io.link import PublishLink
from magne.io.stats import Stats

log = logs.Log("magne.io")

CH = 1
MAX_BLAME = 4


class Settlement:
    def __init__(self, link: PublishLink, stats: Stats) -> None:
        self.link = link
        self.stats = stats
        self.gen = 0
        self.out: Outbox | None = None  # the consuming connection's outbox, for this generation
        self.acks = AckCoalescer()
        self.unsent: deque[Delivery] = deque()
        self.backoff = Backoff(1.0, 30.0)
        self.retry_at = 0.0
        self.accepting = True  # False once the channel is closing: nothing more is written on it
        link.on_confirm = self._on_confirm

    def reset(self, gen: int, out: Outbox | None) -> None:
        """A new channel generation: fresh tags. Copies of the old one are dropped (their originals come back)."""
        self.gen, self.out, self.acks, self.accepting = gen, out, AckCoalescer(), out is not None
        stale = [d for d in self.unsent if d.gen != gen]
        if stale:
            self.stats.stale += len(stale)
            self.unsent = deque(d for d in self.unsent if d.gen == gen)

    def pending_copies(self) -> int:
        return len(self.unsent) + len(self.link.confirms)

    # -- outcomes from the pool ----------------------------------------------------------
    def drain(self, outcomes: deque[Delivery], now: float) -> int:
        """Settle every outcome handed back since the last call; returns how many were of this generation."""
        gen = self.gen
        finished: list[int] = []
        n = 0
        ack, retry, dead = Outcome.ACK, Outcome.RETRY, Outcome.DEAD  # locals: this loop runs per message
        tally = self.stats.tally  # None unless --metrics: then acks are also counted by (queue, task)
        acked = tally.acked if tally is not None else None
        while outcomes:
            d = outcomes.popleft()
            if d.gen != gen or not self.accepting:
                self.stats.stale += 1
                continue
            n += 1
            try:
                o = d.outcome
                if o is ack:
                    finished.append(d.tag)
                    if acked is not None:  # an ACK ran a registered task, so d.task is a bounded label
                        key = (d.queue, d.task)
                        acked[key] = acked.get(key, 0) + 1
                elif o is retry or o is dead:
                    self.copy(d)
                elif o is Outcome.GIVE_BACK:
                    self._requeue(d.tag, counts=False)
                elif o is Outcome.REQUEUE:
                    self._requeue(d.tag, counts=True, d=d)
                else:
                    raise ValueError(f"unknown outcome {o!r}")
            except Exception as exc:  # contain it to this message: it goes back to the queue
                log.error("settling message %s failed (%s: %s); requeueing it", d.message_id(), type(exc).__name__, exc)
                self._requeue(d.tag, counts=True, d=d)
        if finished:
            self.ack(finished)
            if tally is not None:
                tally.ack_batch.observe(len(finished))
        return n

    def ack(self, tags: list[int]) -> None:
        """Tasks that succeeded: counted as acked, then written."""
        self.stats.acked += len(tags)
        self._write_acks(tags)

    def _write_acks(self, tags: list[int]) -> None:
        assert self.out is not None
        for tag, multiple in self.acks.settle(tags):
            self.out.write(codec.encode_ack(CH, tag, multiple))

    def give_back(self, tags: list[int]) -> None:
        """Deliveries that never started: basic.nack(requeue), which no delivery limit counts."""
        for tag in tags:
            self._requeue(tag, counts=False)

    def _requeue(self, tag: int, counts: bool, d: Delivery | None = None) -> None:
        """The one place a delivery goes back to its queue. `counts`: reject (it ran); else nack (it never started).
        `d`, when known, is counted by queue and task under --metrics."""
        if self.out is None or not self.accepting:
            return
        self.out.write(codec.encode_reject(CH, tag, True) if counts else codec.encode_nack(CH, tag, False, True))
        self.acks.mark_sent(tag)
        self.stats.requeued += 1
        if not counts:
            self.stats.given_back += 1
        elif d is not None and self.stats.tally is not None:
            self.stats.tally.count(self.stats.tally.requeued, d.queue, d.task)

    # -- copies ----------------------------------------------------------------------------
    def copy(self, d: Delivery) -> None:
        """A retry or dead letter: queue its copy for the link; the original is acked when the copy is confirmed."""
        err = d.error or {}
        what = f"{d.reason} ({err.get('type')}: {logs.clean(err.get('message', ''))})" if err else d.reason
        task = logs.clean(d.task or "?", 100)
        if d.outcome is Outcome.RETRY:
            log.warning("message %s (task %s) from queue %s failed: %s; retrying it in %.1fs",
                        d.message_id(), task, d.queue, what, d.delay,
                        event="retry", task=task, queue=d.queue, reason=d.reason, outcome="retry")
        else:
            log.warning("message %s (task %s) from queue %s failed: %s; dead-lettering it to %s",
                        d.message_id(), task, d.queue, what, d.copy_to,
                        event="dead_letter", task=task, queue=d.queue, reason=d.reason, outcome="dead")
        self.unsent.append(d)

    def service(self, now: float) -> float | None:
        """Publish waiting copies when the link can take them; open it when needed. Returns the next wake-up."""
        if not self.unsent or now < self.retry_at:
            return self.retry_at if self.unsent else None
        link = self.link
        if not link.is_open:
            link.open(now)
            return now + 0.05
        if not link.ready:
            return None  # the selector wakes us as it opens
        while self.unsent:
            d = self.unsent[0]
            if d.blame and link.confirms:
                return None  # a suspect copy goes alone, once everything before it is confirmed
            self.unsent.popleft()
            if d.blame >= 2:
                d.copy_declare = None
            try:
                link.publish(d, now)
            except Exception as exc:  # contain it to this copy (a header that cannot be framed, say)
                log.error("copy of message %s cannot be written (%s: %s); requeueing the original",
                          d.message_id(), type(exc).__name__, exc)
                self.stats.copy_failures += 1
                self._copy_failed(d)
                continue
            if d.blame:
                return None
        self.backoff.reset()
        return None

    def link_failed(self, exc: BaseException, now: float) -> None:
        unconfirmed = self.link.fail()
        pending = [d for d in unconfirmed if d.gen == self.gen]
        self.stats.stale += len(unconfirmed) - len(pending)  # their originals come back redelivered
        # Blame the oldest copy only when the broker refused something we sent (a channel error, or a
        # 5xx connection error such as 501 FRAME_ERROR); not for a node shutting down (320) or a lost socket.
        refused = isinstance(exc, ChannelClosed) or (isinstance(exc, ConnectionClosed) and 500 <= exc.code < 600)
        if pending and refused:
            suspect = pending[0]
            suspect.blame += 1
            if suspect.blame >= 2:
                _strip_user_headers(suspect)
            if suspect.blame >= MAX_BLAME:
                pending.pop(0)
                log.error("the broker keeps refusing the copy of message %s (%s); requeueing the original",
                          suspect.message_id(), exc, event="copy_refused")
                self.stats.copy_failures += 1
                self._copy_failed(suspect)
        self.unsent.extendleft(reversed(pending))
        delay = self.backoff.next()
        self.retry_at = now + delay
        log.warning("publishing connection failed: %s; %d copies will be published again in %.1fs "
                    "(their originals stay unacked until then)", exc, len(self.unsent), delay, event="link_failed")

    def _on_confirm(self, d: Delivery, ok: bool, why: str) -> None:
        """From the link: the broker has (or refused) the copy; now the original can be settled."""
        if d.gen != self.gen or not self.accepting:
            self.stats.stale += 1  # its channel is gone: the original comes back redelivered
            return
        if ok:
            tally = self.stats.tally
            if d.outcome is Outcome.RETRY:
                self.stats.retried += 1
                if tally is not None:
                    tally.count(tally.retried, d.queue, d.task)
            else:
                self.stats.dead += 1
                if tally is not None:
                    tally.count(tally.dead, d.queue, d.task)
            self._write_acks([d.tag])  # counted as retried or dead above, not as acked
            return
        self.stats.copy_failures += 1
        d.blame += 1
        if d.blame >= MAX_BLAME:
            log.error("copy of message %s to %s was %s %d times; requeueing the original",
                      d.message_id(), d.copy_to, why, d.blame, event="copy_refused")
            self._copy_failed(d)
            return
        delay = self.backoff.next()
        self.retry_at = max(self.retry_at, time.monotonic() + delay)
        log.warning("copy of message %s to %s was %s; publishing it again in %.1fs (the original stays unacked)",
                    d.message_id(), d.copy_to, why, delay, event="copy_failed")
        self.unsent.append(d)

    def _copy_failed(self, d: Delivery) -> None:
        """Give up on a copy: the original goes back to its queue (counted as a delivery: it ran)."""
        self._requeue(d.tag, counts=True, d=d)


def _strip_user_headers(d: Delivery) -> None:
    """Leave out the publisher's headers of a copy the broker keeps refusing; properties and magne's headers stay."""
    note = {wire.DROPPED: "publisher headers left out: the broker refused the copy with them"}
    try:
        d.copy_header = properties.splice(d.copy_header, note, lambda k: not wire.is_magne_header(k))
    except Exception:
        d.copy_header = codec.header_payload(commands.Basic.Properties(delivery_mode=2, headers=note), len(d.body))
