"""What became of a message, for `magne.cancel` and `magne cancel`: per id, whether it had already finished.

A cancel is recorded first (magne.cancels: the record is confirmed before any lookup, and it is written for a finished
id too: harmless, and a duplicate or a retry copy of that message still in flight will not run). Then this module
reads what magne already records, with a short deadline (LOOKUP, 2 s): the task events stream (magne.events: every
message's outcome, while workers run with events on) and the results stream (magne.results: messages that asked
for their result, pipelines, groups, chords). No worker needs to be up.

Where a read starts: every id magne makes carries its send time (magne.wire.new_id, magne.workflow.sent_at_ms), so
the read starts a minute before it. Other ids (a foreign publisher's, or a uuid4 from magne before 2026-12-06) are
read newest first: the last 5 minutes, then the last hour, then what the streams keep, as far as the deadline allows.
Where a read ends: a stream has no end marker, so the newest window's read appends one of its own to each stream (an
empty batch of events, `{}` in the results: records every reader skips, as magne.cancels' Follower and magne.leader
do) and ends when it reads it back; it cannot wait for quiet (a fleet at work writes batches more often than IDLE) nor trust a
record's time (the worker's clock). Older windows end at a record dated past them, or after IDLE seconds of quiet; a
read also ends when every id was found finished, or at the deadline.

What it answers (CancelResult, a str equal to the id: callers comparing or storing the ids keep working):
  finished   a record shows it finished (succeeded, failed, dead-lettered or cancelled): when, and where if known;
  cancelled  it had not finished: a record shows it cancelled after (or within SKEW before) this cancel was made,
             this cancel's own effect (a worker skipped or interrupted it), not "already finished";
  not-seen   both streams were read back to its send time (or what they keep) and nothing shows it finished; a
             message that finished in the last ~0.5 s may not be recorded yet (events are batched);
  unknown    the read did not get that far (deadline, no events stream, beyond retention, a broker error).
Records are anyone's who may write to those streams: every value is checked for its type and range (`_record`).
A group id (`<id>.g<n>`) is finished once every member is; a chord's and a pipeline's id have records of their own.

Threads: `cancel`, `look_up` on the caller's (waiting in slices); the readers' callbacks on the client's loop thread.
"""

from __future__ import annotations

import dataclasses
import math
import threading
import time
from typing import Any

import orjson
from pamqp import commands

from magne import cancels, events, logs, streams, wire, workflow
from magne.amqp import names
from magne.amqp.errors import MagneError
from magne.engine.client import Client
from magne.engine.session import Delivered
from magne.publisher import default_publisher

log = logs.Log("magne.outcomes")

LOOKUP = 2.0  # seconds a lookup may take at most
IDLE = 0.3  # a stream that delivered nothing for this long was read to its end
SLACK = 60.0  # a read starts this long before a magne id's send time (the worker's and our clocks)
SKEW = 2.0  # a record written this long after a window's end shows the read went past it
WINDOWS = (300.0, 3600.0)  # an id with no send time: the last 5 minutes first, then the last hour, then all kept
FINAL = ("succeeded", "dead-lettered", "cancelled", "failed")  # "failed": a result record's failure
PREFETCH, ACK_EVERY = 1000, 200
FEW = 32  # up to this many ids, a batch of events is searched for them as bytes before it is parsed


class CancelResult(str):
    """One cancelled id (equal to it, hashed like it) with what is known of its message. `state`: finished, cancelled
    (this cancel stopped it), not-seen or unknown (module docstring); `outcome`: succeeded, failed, dead-lettered or
    cancelled when finished, else the last event seen that is not final (retried, requeued, returned) or None; `at`
    (seconds since the epoch), `host`, `pid`, `task`, `queue`, `reason`, `error`, `source` (events or results) when
    known; `since`: the time the records were read from; `note`: why unknown, or a group's count."""

    state: str
    outcome: str | None
    at: float | None
    host: str | None
    pid: int | None
    task: str | None
    queue: str | None
    reason: str | None
    error: dict[str, Any] | None
    source: str | None
    since: float | None
    note: str | None

    def __new__(cls, mid: str, state: str = "unknown", **known: Any) -> CancelResult:
        self = super().__new__(cls, mid)
        self.state = state
        for k in ("outcome", "at", "host", "pid", "task", "queue", "reason", "error", "source", "since", "note"):
            setattr(self, k, known.get(k))
        return self

    @property
    def id(self) -> str:
        return str.__str__(self)

    @property
    def finished(self) -> bool:
        return self.state == "finished"

    def as_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"id": self.id, "state": self.state}
        for k in ("outcome", "at", "host", "pid", "task", "queue", "reason", "error", "source", "since", "note"):
            if getattr(self, k) is not None:
                out[k] = getattr(self, k)
        return out


def cancel(*message_ids: str, publisher: Any = None, check: bool = True,
           timeout: float = LOOKUP) -> list[CancelResult]:
    """Cancel messages by id (magne.cancels.cancel: one not started never runs, one running is interrupted, for the
    retention window, across worker restarts), then say per id whether it had already finished (`check`: read the
    events and results streams for at most `timeout` seconds). Returns one CancelResult per id, in order, each equal
    to its id (as `cancel` returned the ids before). The cancel is recorded, and confirmed, for every id, finished or
    not. ValueError for a bad id; what the broker refuses while recording raises; a lookup that fails, in any way,
    answers "unknown" (the cancel is recorded by then: raising would say it was not). Calling thread."""
    pub = publisher if publisher is not None else default_publisher()
    made = time.time()
    ids = cancels.cancel(*message_ids, publisher=pub)
    if not check:
        return [CancelResult(m, note="not looked up") for m in ids]
    try:
        return look_up(pub._running(), ids, timeout, cancelled_at=made)
    except Exception as exc:  # a lookup is best-effort, and comes after the cancel was recorded
        why = f"the lookup failed: {type(exc).__name__}: {logs.clean(str(exc), 120)}"
        log.warning("cancelled %d message(s); %s", len(ids), why, event="cancel_lookup_failed")
        return [CancelResult(m, note=why) for m in ids]


class Found:
    """What the readers found, filled on the client's loop thread: per id its first final record and its last
    non-final event (a group id: per member index its first final record)."""

    def __init__(self, ids: list[str]) -> None:
        self.plain = {m for m in ids if not workflow.CHORD_GROUP.fullmatch(m)}
        self.groups = {m: int(g.group(1)) for m in ids if (g := workflow.CHORD_GROUP.fullmatch(m))}
        self.final: dict[str, dict[str, Any]] = {}
        self.last: dict[str, dict[str, Any]] = {}
        self.members: dict[str, dict[int, dict[str, Any]]] = {g: {} for g in self.groups}
        # As the ids appear in a batch (orjson, as magne.events writes it: quotes, backslashes, control characters
        # escaped); a group's members as `"<group>.`.
        self.needles = [orjson.dumps(m)[:-1] + b"." if m in self.groups else orjson.dumps(m)
                        for m in ids] if len(ids) <= FEW else None
        self.closed = False

    def complete(self) -> bool:
        return len(self.final) == len(self.plain) and all(len(self.members[g]) == n for g, n in self.groups.items())

    def add(self, mid: Any, rec: dict[str, Any]) -> None:
        """One normalised record (outcome, at, ...) of message `mid`: the first final one wins."""
        if not isinstance(mid, str):
            return
        if mid in self.plain:
            if rec["outcome"] in FINAL:
                self.final.setdefault(mid, rec)
            else:
                self.last[mid] = rec
            return
        group, _, index = mid.rpartition(".")
        if group in self.groups and index.isdigit() and int(index) < self.groups[group]:
            if rec["outcome"] in FINAL:
                self.members[group].setdefault(int(index), rec)

    def on_events(self, m: Delivered) -> float | None:
        """Loop thread: a batch of events. The time of its first row (a read's progress)."""
        if self.needles is not None and not any(n in m.body for n in self.needles):
            return _first_time(m.body)
        rows = events.parse(m.body)
        for e in rows:
            if isinstance(e.get("id"), str):
                self.add(e["id"], _record(e.get("event"), e.get("t"), "events", host=e.get("host"), pid=e.get("pid"),
                                          task=e.get("task"), queue=e.get("queue"), reason=e.get("reason"),
                                          error=e.get("error")))
        t = rows[0].get("t") if rows else None
        return t if _plausible(t) else None

    def on_results(self, m: Delivered) -> float | None:
        """Loop thread: a result record (its message_id is the record's id: only a match is parsed). Its time."""
        mid = cancels.message_id_of(m.header)
        if mid is None or not (mid in self.plain or mid.rpartition(".")[0] in self.groups):
            return None
        rec = wire.loads(m.body)
        if not isinstance(rec, dict) or type(rec.get("ok")) is not bool:
            return None
        reason = rec.get("reason") if isinstance(rec.get("reason"), str) else None
        outcome = "succeeded" if rec["ok"] else "cancelled" if reason == "cancelled" else "failed"
        if isinstance(rec.get("of"), str) and not rec["ok"]:
            reason = f"{reason or 'failed'} (step {logs.clean(rec['of'], 120)})"
        found = _record(outcome, rec.get("at"), "results", task=rec.get("task"), reason=reason, error=rec.get("error"))
        if isinstance(rec.get("id"), str):
            self.add(rec["id"], found)
        return found["at"]


def _record(outcome: Any, at: Any, source: str, **known: Any) -> dict[str, Any]:
    """A record normalised: each value of the type and range a worker writes, else None (an empty text too), so that
    what someone else wrote into a stream can neither break the answer's line or JSON nor pass for a time."""
    out: dict[str, Any] = {"outcome": outcome if isinstance(outcome, str) and len(outcome) <= 40 else None,
                           "at": at if _plausible(at) else None, "source": source}
    for k in ("host", "task", "queue", "reason"):
        v = known.get(k)
        out[k] = logs.clean(v, 200) if isinstance(v, str) and v else None
    pid = known.get("pid")
    out["pid"] = pid if isinstance(pid, int) and not isinstance(pid, bool) and 0 < pid < 1 << 32 else None
    err = known.get("error")
    err = {k: logs.clean(err[k], 200) for k in ("type", "message") if isinstance(err.get(k), str)} \
        if isinstance(err, dict) else {}
    out["error"] = err or None
    return out


def _plausible(t: Any) -> bool:
    """Whether `t` can be a time a worker wrote (seconds since the epoch, not in the far future)."""
    return isinstance(t, int | float) and not isinstance(t, bool) and math.isfinite(t) \
        and 0 < t < time.time() + 86_400


def _first_time(body: bytes) -> float | None:
    """The first row's time of a batch of events, without parsing the batch (it is `"rows":[[<t>,`)."""
    i = body.find(b'"rows":[[')
    if i < 0:
        return None
    j = body.find(b",", i + 9)
    try:
        t = float(body[i + 9:j])
    except ValueError:
        return None
    return t if _plausible(t) else None


@dataclasses.dataclass
class Read:
    """One stream read from `since` on, until its end (module docstring) or `until` (a record written after it)."""

    stream: str
    since: float
    until: float
    handle: Any
    tag: str = ""
    last: float = 0.0  # time.monotonic() of the last delivery (or of the consume-ok)
    ended: bool = False  # read to its end (or past `until`)
    empty: bytes = b"{}"  # a record every reader of the stream skips (the body of the marker)
    marker: str | None = None  # the message id of the marker this lookup appended: the stream's end when it began
    error: str | None = None
    unacked: int = 0


def _run(client: Client, reads: list[Read], found: Found, deadline: float, mark: bool = False) -> None:
    """Run reads side by side until each ended, every id was found, or the deadline. `mark`: append a marker to each
    stream first, and end its read there (a read up to now: a busy stream is never quiet for IDLE, and a worker's
    clock may differ from ours by more than SKEW). Calling thread; the readers' callbacks on the loop thread."""
    for r in reads:
        def on_message(m: Delivered, r: Read = r) -> None:
            if found.closed:
                return
            if r.marker is not None and cancels.message_id_of(m.header) == r.marker:
                r.ended = True
                return
            r.last = time.monotonic()
            r.unacked += 1
            if r.unacked >= ACK_EVERY:  # a stream consumer's credit
                r.unacked = 0
                client.ack(m.tag, m.gen, multiple=True)
            try:
                t = r.handle(m)
            except (ValueError, TypeError, RecursionError):
                return  # not a record of ours
            if t is not None and t >= r.until and r.marker is None:
                r.ended = True
        try:
            # Passively first, on the session meant for refusals: a consume of a stream that does not exist (workers
            # with --events off) would close the channel this process's own consumers share (in a worker: its
            # cancels and control queue), and make the client subscribe all of them again.
            client.call(names.QueueDeclare(queue=r.stream, passive=True), commands.Queue.DeclareOk,
                        timeout=max(0.1, deadline - time.monotonic()), session=client.locks)
            if mark:
                _mark(client, r, deadline)
            r.tag = client.consume(r.stream, on_message, PREFETCH, {"x-stream-offset": streams.offset_at(r.since)},
                                   timeout=max(0.1, deadline - time.monotonic()))
            r.last = time.monotonic()
        except MagneError as exc:  # ChannelClosed 404: no such stream; a broker timeout
            r.error = f"{type(exc).__name__}: {logs.clean(str(exc), 120)}"
    try:
        while not found.complete():
            now = time.monotonic()
            for r in reads:
                if r.tag and not r.ended and r.marker is None and now - r.last >= IDLE:
                    r.ended = True
            if all(r.ended or not r.tag for r in reads) or now >= deadline:
                break
            time.sleep(0.02)
    finally:
        barrier = threading.Event()
        for r in reads:
            if r.tag:
                client.cancel(r.tag)
        client.submit(barrier.set)  # after the cancels: no callback of these reads runs past this point
        barrier.wait(0.5)
        found.closed = True


def _mark(client: Client, r: Read, deadline: float) -> None:
    """Append a marker to the stream (an empty batch of events, or `{}`: what every reader of it skips) and remember
    its id. A publish refused (no write permission) or late leaves the read to end by IDLE and `until`."""
    marker = f"magne.lookup.{wire.new_id()}"
    if streams.mark(client, r.stream, r.empty, max(0.1, deadline - time.monotonic()), marker):
        r.marker = marker


def plan(ids: list[str], now: float) -> list[tuple[float, float]]:
    """The windows to read, newest first, as (since, until): from the earliest send time when every id has one,
    else the last WINDOWS and then everything kept."""
    sent = [_sent_ms(m, now) for m in ids]
    if all(s is not None for s in sent):
        return [(min(s for s in sent if s is not None) / 1000 - SLACK, now + SKEW)]
    out, until = [], now + SKEW
    for back in (*WINDOWS, None):
        since = 0.0 if back is None else now - back
        out.append((since, until))
        until = since + SKEW
    return out


def _sent_ms(mid: str, now: float) -> int | None:
    """`mid`'s send time (workflow.sent_at_ms), unless later than `now` + SLACK: a sender whose clock runs that far
    ahead put its records before the time its ids show, so such an id is read as one with no send time."""
    sent = workflow.sent_at_ms(mid)
    return sent if sent is not None and sent / 1000 <= now + SLACK else None


def look_up(client: Client, ids: list[str], timeout: float = LOOKUP,
            cancelled_at: float | None = None) -> list[CancelResult]:
    """What is known of each id's message: the events and results streams read as `plan` says, for at most
    `timeout` seconds. `cancelled_at`: when the cancel was made (a record of `cancelled` from then on is its effect,
    state cancelled). Calling thread (not the client's loop thread)."""
    now, deadline = time.time(), time.monotonic() + timeout
    found = Found(ids)
    covered: float | None = None  # the events were read completely back to this time (newest first)
    events_error: str | None = None
    for i, (since, until) in enumerate(plan(ids, now)):
        reads = [Read(events.stream_name(), since, until, found.on_events, empty=b'{"fields":[],"rows":[]}'),
                 Read(workflow.STREAM, since, until, found.on_results)]
        found.closed = False
        _run(client, reads, found, deadline, mark=i == 0)  # the newest window reads up to now
        events_error = reads[0].error
        if events_error is not None or not reads[0].ended:
            break  # no events stream, or the deadline came first: covered stays where the last full read reached
        covered = since
        if found.complete() or time.monotonic() >= deadline:
            break
    return [_answer(m, found, covered, events_error, now, cancelled_at) for m in ids]


def _coverage(mid: str, covered: float | None, events_error: str | None, now: float) -> tuple[bool, str | None]:
    """Whether the task events were read completely back to where `mid`'s record would be; else why not."""
    sent = _sent_ms(mid, now)
    start = sent / 1000 - SLACK if sent is not None else 0.0
    if events_error is not None:
        return False, f"no task events to read ({events_error}): workers may run with --events off"
    if sent is not None and sent / 1000 < now - events.retention():
        return False, "sent before the oldest task events kept (MAGNE_EVENTS_RETENTION)"
    if covered is None:
        return False, "no task events read within the deadline"
    if covered > start:
        return False, f"task events read back to {_when(covered)} only, within the deadline"
    return True, None


def _ours(rec: dict[str, Any], cancelled_at: float | None) -> bool:
    """Whether a final record is this cancel's own effect: cancelled, at or after the cancel was made (less SKEW,
    for the worker's clock)."""
    at = rec.get("at")
    return cancelled_at is not None and rec["outcome"] == "cancelled" and at is not None and at >= cancelled_at - SKEW


def _answer(mid: str, found: Found, covered: float | None, events_error: str | None, now: float,
            cancelled_at: float | None = None) -> CancelResult:
    if mid in found.groups:
        return _group(mid, found, covered, events_error, now, cancelled_at)
    rec = found.final.get(mid)
    if rec is not None:
        return CancelResult(mid, "cancelled" if _ours(rec, cancelled_at) else "finished", **rec)
    last = found.last.get(mid, {})
    known = {k: last.get(k) for k in ("outcome", "at", "host", "pid", "task", "queue", "reason", "source")}
    complete, why = _coverage(mid, covered, events_error, now)
    if complete:
        return CancelResult(mid, "not-seen", since=covered or None, **known)
    return CancelResult(mid, note=why, since=covered, **known)


def _group(gid: str, found: Found, covered: float | None, events_error: str | None, now: float,
           cancelled_at: float | None = None) -> CancelResult:
    """A group is finished once every member is (members cancelled included): its last member's time; cancelled
    (not finished before) if this cancel stopped any of them."""
    n, done = found.groups[gid], found.members[gid]
    failed = [r for r in done.values() if r["outcome"] != "succeeded"]
    note = f"{len(done)} of {n} members finished" + (f", {len(failed)} did not succeed" if failed else "")
    if len(done) == n:
        at = max((r["at"] for r in done.values() if isinstance(r.get("at"), int | float)), default=None)
        if any(_ours(r, cancelled_at) for r in done.values()):
            return CancelResult(gid, "cancelled", outcome="cancelled", at=at, note=note)
        return CancelResult(gid, "finished", outcome=failed[0]["outcome"] if failed else "succeeded", at=at, note=note)
    complete, why = _coverage(gid, covered, events_error, now)
    if complete:
        return CancelResult(gid, "not-seen", since=covered or None, note=note)
    return CancelResult(gid, note=f"{why}; {note}", since=covered)


def _when(t: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(t))
