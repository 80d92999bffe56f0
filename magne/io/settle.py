"""Settlement: outcomes back from the pool become frames on the consuming channel.

Runs on the I/O thread only. Acks go through the eager coalescer (magne.acks);
requeues are written here and only here (`_requeue`: the frame, the coalescer's
note that the tag is settled, the count). A retry or dead letter is a copy to
publish first, through the engine's Sender (the worker's publishing link: its own
connection, opened when there are copies to make); its original is acked only once
the broker confirmed the copy, so a crash in between can duplicate but never lose.

A copy the broker refuses (nacked by a full delay or dead-letter queue, returned,
refused with the channel) is published again with backoff, and the warning names the
message and the queue; its original stays unacked meanwhile and its task is never run
again for it: its failure is only waiting to be recorded. From the second refusal the
copy goes with magne's headers only (the publisher's may be what the broker refuses),
and after a refused declaration of its queue, without the declaration. (RabbitMQ 3.x's
consumer_timeout, 30 min by default, may close the consuming channel meanwhile: the
original then comes back and runs again; 3.12+ honours the worker's x-consumer-timeout.)
"""

from __future__ import annotations

import heapq
import math
import time
from collections import deque

from pamqp import commands

from magne import logs, wire
from magne.acks import AckCoalescer
from magne.amqp import codec, properties
from magne.amqp.errors import FrameError, MagneError, PublishError
from magne.amqp.outbox import Outbox
from magne.backoff import Backoff
from magne.delivery import Delivery, Outcome
from magne.engine.sender import Outgoing, Prep, Sender
from magne.io.follow import Again, Followups
from magne.io.stats import Stats
from magne.workflow import asks, on_dead

log = logs.Log("magne.io")

CH = 1
REDECLARE = 10.0  # a delay queue's declaration is repeated after this long (its x-expires counts from it)
MAX_COPY_BACKOFF = 60.0
ALERT_AFTER = 3  # refusals of one copy after which the warning becomes an error


class Copy(Outgoing):
    """The retry or dead-letter copy of a delivery, on its way through the Sender."""

    __slots__ = ("d",)


class Settlement:
    def __init__(self, sender: Sender, stats: Stats, frame_max: int) -> None:
        self.sender = sender
        self.stats = stats
        self.frame_max = frame_max
        self.gen = 0
        self.out: Outbox | None = None  # the consuming connection's outbox, for this generation
        self.acks = AckCoalescer()
        self.waiting: list[tuple[float, int, Delivery | Again]] = []  # (when to publish again, tie-break, copy): refused
        self._seq = 0
        self._preps: dict[str, Prep] = {}  # copy_to -> its declaration (bounded: queues and rounded delays)
        self.accepting = True  # False once the channel is closing: nothing more is written on it
        self.follow = Followups(sender, frame_max, self._followed, self._later)  # results, next steps (magne.workflow)

    def reset(self, gen: int, out: Outbox | None) -> None:
        """A new channel generation: fresh tags. Copies of the old one are dropped (their originals come back)."""
        self.gen, self.out, self.acks, self.accepting = gen, out, AckCoalescer(), out is not None
        self.follow.reset(gen)
        stale = [c for c in self.sender.queue if isinstance(c, Copy) and c.d.gen != gen]
        stale_waiting = [w for w in self.waiting if w[2].gen != gen]
        if stale or stale_waiting:
            self.stats.stale += len(stale) + len(stale_waiting)
            self.sender.queue = deque(c for c in self.sender.queue if not (isinstance(c, Copy) and c.d.gen != gen))
            self.sender.suspects.difference_update(stale)  # never settled now: a suspect left would keep it one at a time
            self.waiting = [w for w in self.waiting if w[2].gen == gen]
            heapq.heapify(self.waiting)

    @property
    def unsent(self) -> bool:
        return bool(self.sender.queue or self.waiting)

    def pending_copies(self) -> int:
        return len(self.waiting) + self.sender.pending()

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
                    if d.follow is not None:  # it asked for its result or is a workflow step: those go first
                        self.follow.put(d, d.follow)
                        continue
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
        """A retry or dead letter: hand its copy to the sender; the original is acked when the copy is confirmed."""
        err = d.error or {}
        what = f"{d.reason} ({err.get('type')}: {logs.clean(err.get('message', ''))})" if err else d.reason
        task = logs.clean(d.task or "?", 100)
        if d.reason == "not due":  # a foreign message's eta (magne.formats.defer): it waits on the broker
            log.info("message %s (task %s) from queue %s is not due for %.1fs; it waits in %s", d.message_id(), task,
                     d.queue, d.delay, d.copy_to, event="deferred", task=task, queue=d.queue)
        elif d.outcome is Outcome.RETRY:
            log.warning("message %s (task %s) from queue %s failed: %s; retrying it in %.1fs",
                        d.message_id(), task, d.queue, what, d.delay,
                        event="retry", task=task, queue=d.queue, reason=d.reason, outcome="retry")
        else:
            log.warning("message %s (task %s) from queue %s failed: %s; dead-lettering it to %s",
                        d.message_id(), task, d.queue, what, d.copy_to,
                        event="dead_letter", task=task, queue=d.queue, reason=d.reason, outcome="dead")
        self._publish(d)

    def _publish(self, d: Delivery) -> None:
        """Make the copy's frames (falling back to magne's headers only if the copy's header cannot be framed)."""
        preps: tuple[Prep, ...] = ()
        if d.copy_declare is not None:
            prep = self._preps.get(d.copy_to)
            if prep is None:
                ttl = REDECLARE if d.outcome is Outcome.RETRY else None
                prep = self._preps[d.copy_to] = Prep(("copy", d.copy_to), [(d.copy_declare, commands.Queue.DeclareOk)],
                                                     ttl=ttl, what=d.copy_to)
            preps = (prep,)
        try:
            c = Copy("", d.copy_to, d.copy_header, d.body, _message_id(d.copy_header), preps, math.inf, self.frame_max,
                     self._copied)
        except Exception as exc:  # a header that cannot be framed: contain it to this copy
            log.error("copy of message %s cannot be framed (%s: %s); sending it with magne's headers only",
                      d.message_id(), type(exc).__name__, exc, event="copy_unframable")
            _strip_user_headers(d)
            try:
                c = Copy("", d.copy_to, d.copy_header, d.body, _message_id(d.copy_header), preps, math.inf,
                         self.frame_max, self._copied)
            except Exception:
                self.stats.copy_failures += 1
                self._copy_failed(d)
                return
        c.d = d
        self.sender.put(c)

    def service(self, now: float) -> float | None:
        """Copies refused earlier whose backoff ran out go to the sender again. Returns the next wake-up."""
        waiting = self.waiting
        while waiting and waiting[0][0] <= now:
            item = heapq.heappop(waiting)[2]
            if isinstance(item, Again):
                self.follow.again(item)
            else:
                self._publish(item)
        return waiting[0][0] if waiting else None

    def _copied(self, c: Outgoing, error: MagneError | None) -> None:
        """From the sender (I/O thread): the broker has, or refused, the copy; now the original can be settled."""
        d = c.d  # type: ignore[attr-defined]
        if d.gen != self.gen or not self.accepting:
            self.stats.stale += 1  # its channel is gone: the original comes back redelivered
            return
        if error is None:
            tally = self.stats.tally
            if d.outcome is Outcome.RETRY:
                self.stats.retried += 1
                if tally is not None:
                    tally.count(tally.retried, d.queue, d.task)
            else:
                self.stats.dead += 1
                if tally is not None:
                    tally.count(tally.dead, d.queue, d.task)
                if asks(d.header) and self._follow_dead(d):
                    return  # its failure record goes first
            self._write_acks([d.tag])  # counted as retried or dead above, not as acked
            return
        self.stats.copy_failures += 1
        d.blame += 1
        if d.blame >= 2 or isinstance(error, FrameError):
            _strip_user_headers(d)
        if isinstance(error, PublishError) and error.permanent:
            # Its declaration was refused (the queue exists with other arguments): publish to it as it is. Not for a
            # permanent error of the link's connection (a vhost at its connection limit): that says nothing of the queue.
            d.copy_declare = None
        backoff = Backoff(1.0, MAX_COPY_BACKOFF)
        backoff.attempt = d.blame - 1  # the copy's refusals so far set how long it waits
        delay = backoff.next()
        self._seq += 1
        heapq.heappush(self.waiting, (time.monotonic() + delay, self._seq, d))
        where = "dead-letter queue" if d.outcome is Outcome.DEAD else "delay queue"
        (log.error if d.blame >= ALERT_AFTER else log.warning)(
            "copy of message %s to %s %s was refused %d times (%s); publishing it again in %.1fs. The original stays "
            "unacked and its task does not run again meanwhile", d.message_id(), where, d.copy_to, d.blame, error,
            delay, event="copy_refused", queue=d.queue)

    def _follow_dead(self, d: Delivery) -> bool:
        """A dead letter that asked for its result: publish its failure record (and its pipeline's) before the ack."""
        try:
            nexts = on_dead(d)
        except Exception as exc:  # contained: the dead letter is safe; only its record is missing
            log.error("the failure record of message %s could not be made (%s)", d.message_id(), type(exc).__name__)
            return False
        if nexts:
            self.follow.put(d, nexts)
        return bool(nexts)

    def _followed(self, d: Delivery) -> None:
        """Every follow-up of `d` is confirmed: ack it now (counted as acked if it succeeded; a dead letter was
        counted when its copy was confirmed)."""
        if d.gen != self.gen or not self.accepting:
            self.stats.stale += 1
            return
        if d.outcome is Outcome.ACK:
            self.stats.acked += 1
            if self.stats.tally is not None:
                self.stats.tally.count(self.stats.tally.acked, d.queue, d.task)
        self._write_acks([d.tag])

    def _later(self, when: float, again: Again) -> None:
        self._seq += 1
        heapq.heappush(self.waiting, (when, self._seq, again))

    def _copy_failed(self, d: Delivery) -> None:
        """Give up on a copy that can never be made: the original goes back to its queue (counted: it ran)."""
        self._requeue(d.tag, counts=True, d=d)


def _message_id(header: bytes) -> str | None:
    """A copy's message id, as a basic.return of it will carry it (cold path: copies only)."""
    try:
        mid = codec.decode_properties(header).message_id
    except Exception:
        return None
    return mid if isinstance(mid, str) else None


def _strip_user_headers(d: Delivery) -> None:
    """Leave out the publisher's headers of a copy the broker keeps refusing; properties and magne's headers stay."""
    note = {wire.DROPPED: "publisher headers left out: the broker refused the copy with them"}
    try:
        d.copy_header = properties.splice(d.copy_header, note, lambda k: not wire.is_magne_header(k))
    except Exception:
        d.copy_header = codec.header_payload(commands.Basic.Properties(delivery_mode=2, headers=note), len(d.body))

