"""What `magne.cancel` says of an id that already finished (magne.outcomes), without a broker: records of both streams
read into per-id answers, the windows a read takes, "unknown" never said as "not finished", the CLI's lines."""

from __future__ import annotations

import time

import orjson
from pamqp import commands

from magne import controlcli, outcomes, workflow
from magne.amqp import codec
from magne.engine.session import Delivered
from magne.outcomes import CancelResult, Found


def batch(*rows, host="vm", pid=42):
    fields = ["t", "event", "task", "queue", "id", "started", "duration", "reason", "error"]
    return Delivered(1, 1, b"", orjson.dumps({"host": host, "pid": pid, "fields": fields, "rows": list(rows)}), False)


def record(mid, ok=True, **kw):
    body = orjson.dumps({"id": mid, "task": "add", "ok": ok, "at": 1796566330.5, **kw})
    header = codec.header_payload(commands.Basic.Properties(content_type="application/json", message_id=mid), len(body))
    return Delivered(1, 1, header, body, False)


def test_a_cancel_result_is_its_id_for_callers_that_compare_store_or_serialise_the_ids():
    r = CancelResult("abc", "finished", outcome="succeeded", at=1.5, pid=7)
    assert r == "abc" and [r] == ["abc"] and hash(r) == hash("abc") and {r: 1}["abc"] == 1
    assert orjson.dumps([r]) == b'["abc"]' and r.finished and r.id == "abc" and type(r.id) is str
    assert r.as_dict() == {"id": "abc", "state": "finished", "outcome": "succeeded", "at": 1.5, "pid": 7}
    assert not CancelResult("x").finished and CancelResult("x").state == "unknown"


def test_events_give_the_first_final_outcome_with_when_and_where_and_skip_batches_without_the_id():
    mid = "7e0a5b1c9d2e4f3a8b6c0d1e2f3a4b5c"
    f = Found([mid, "other"])
    assert f.on_events(batch([100.0, "succeeded", "t", "q", "unrelated", 99.0, 1.0])) == 100.0  # not parsed: its time
    f.on_events(batch([101.0, "retried", "report", "q", mid, 100.5, 0.5, "task raised"]))
    assert mid not in f.final and f.last[mid]["outcome"] == "retried"
    f.on_events(batch([102.0, "dead-lettered", "report", "q", mid, 101.5, 0.5, "task raised",
                       {"type": "ValueError", "message": "no"}], pid=43))
    f.on_events(batch([103.0, "succeeded", "report", "q", mid, 102.5, 0.1]))  # a duplicate later: the first wins
    assert f.final[mid]["outcome"] == "dead-lettered" and f.final[mid]["pid"] == 43 and f.final[mid]["at"] == 102.0
    assert not f.complete()
    f.on_events(batch([104.0, "cancelled", "report", "q", "other"]))
    assert f.complete()


def test_result_records_answer_too_with_failures_cancels_and_a_pipelines_failing_step():
    f = Found(["a", "b", "c", "d"])
    assert f.on_results(record("a", value=3)) == 1796566330.5
    f.on_results(record("b", ok=False, reason="task raised", error={"type": "KeyError", "message": "x"}))
    f.on_results(record("c", ok=False, reason="cancelled", error={"type": "Cancelled", "message": ""}))
    f.on_results(record("d", ok=False, reason="task raised", of="step-1"))
    f.on_results(record("zzz", value=1))  # not asked for: never parsed, never kept
    assert [f.final[m]["outcome"] for m in "abcd"] == ["succeeded", "failed", "cancelled", "failed"]
    assert f.final["d"]["reason"] == "task raised (step step-1)" and f.final["a"]["source"] == "results"
    assert "zzz" not in f.final and f.complete()


def test_a_group_is_finished_once_every_member_is():
    gid = f"{workflow.new_id()}.g3"
    f = Found([gid])
    f.on_events(batch([1.0, "succeeded", "t", "q", f"{gid}.0"], [2.0, "cancelled", "t", "q", f"{gid}.2"]))
    f.on_events(batch([2.5, "succeeded", "t", "q", f"{gid}.7"]))  # an index the group does not have
    partial = outcomes._answer(gid, f, time.time() - 3600, None, time.time())
    assert partial.state == "not-seen" and partial.note == "2 of 3 members finished, 1 did not succeed"
    f.on_results(record(f"{gid}.1", value=1))
    done = outcomes._answer(gid, f, None, None, time.time())
    assert (done.state, done.outcome, done.at) == ("finished", "cancelled", 1796566330.5)


def test_not_seen_needs_a_complete_read_back_to_the_send_time_else_unknown_with_why():
    now = time.time()
    mid = workflow.new_id()  # sent now: a read from a minute before covers it
    f = Found([mid])
    assert outcomes._answer(mid, f, now - 61, None, now).state == "not-seen"
    short = outcomes._answer(mid, f, now - 10, None, now)  # the deadline came before the read got back that far
    assert short.state == "unknown" and "only, within the deadline" in short.note
    assert outcomes._answer(mid, f, None, None, now).note == "no task events read within the deadline"
    off = outcomes._answer(mid, f, now - 61, "ChannelClosed: 404 NOT_FOUND", now)
    assert off.state == "unknown" and "--events off" in off.note
    old = f"{int((now - 3 * 86400) * 1000):012x}7{'0' * 19}"  # sent three days ago: past the events' retention
    assert "MAGNE_EVENTS_RETENTION" in outcomes._answer(old, Found([old]), 0.0, None, now).note
    uuid4 = "4d1c6f0e2b9a4c8e9f3a1b2c3d4e5f60"  # no send time: only a read of everything kept covers it
    assert outcomes._answer(uuid4, Found([uuid4]), now - 3600, None, now).state == "unknown"
    assert outcomes._answer(uuid4, Found([uuid4]), 0.0, None, now).state == "not-seen"


def test_reads_start_at_the_send_time_or_go_newest_first_through_what_is_kept():
    now = time.time()
    a, b = workflow.new_id(), workflow.new_id()
    [(since, until)] = outcomes.plan([a, b], now)
    assert since == workflow.sent_at_ms(a) / 1000 - outcomes.SLACK and until == now + outcomes.SKEW
    windows = outcomes.plan([a, "4d1c6f0e2b9a4c8e9f3a1b2c3d4e5f60"], now)
    assert [round(now - s) for s, _ in windows] == [300, 3600, round(now)]
    assert windows[1][1] == windows[0][0] + outcomes.SKEW and windows[2][1] == windows[1][0] + outcomes.SKEW
    assert outcomes._first_time(batch([12.5, "succeeded", "t", "q", "x"]).body) == 12.5


def test_the_cli_line_says_plainly_which_and_escapes_what_publishers_chose():
    at = time.mktime((2026, 12, 6, 12, 3, 4, 0, 0, -1))
    done = CancelResult("m-1", "finished", outcome="succeeded", at=at, host="vm", pid=8609, task="report")
    assert controlcli.cancel_line(done) == ("m-1: already finished: succeeded at 2026-12-06 12:03:04 on vm pid 8609, "
                                            "task report; the cancel is recorded anyway (a duplicate or retry of it "
                                            "still in flight will not run)")
    dead = CancelResult("m-2", "finished", outcome="dead-lettered", reason="task raised\x1b[2J", at=at,
                        error={"type": "ValueError"})
    assert "dead-lettered (task raised\\x1b[2J: ValueError) at" in controlcli.cancel_line(dead)
    waiting = CancelResult("m-3", "not-seen", since=at, outcome="retried", at=at)
    assert controlcli.cancel_line(waiting) == (
        "m-3: cancelled: not finished as far as the records show since 2026-12-06 12:03:04; last seen retried at "
        "2026-12-06 12:03:04: it will not run if it has not started; if it is running it is interrupted")
    unknown = controlcli.cancel_line(CancelResult("m-4", note="no task events read within the deadline"))
    assert unknown.startswith("m-4: cancelled: not known whether it already finished (no task events read")
    assert "not finished" not in unknown.replace("already finished", "")
    assert controlcli.cancel_line(CancelResult("m-5", note="not looked up")) == (
        "m-5: cancelled: it will not run if it has not started; if it is running it is interrupted")


def test_a_message_this_cancel_stopped_is_said_stopped_not_already_finished():
    """A record of `cancelled` dated after the cancel was made is this cancel's own effect (a worker interrupted the
    message or skipped it): the message had not finished. One dated well before is an earlier cancel's."""
    t0 = time.time()
    mid, old, gid = workflow.new_id(), workflow.new_id(), f"{workflow.new_id()}.g2"
    f = Found([mid, old, gid])
    f.on_events(batch([t0 + 0.05, "cancelled", "slow", "q", mid, t0 - 3.0, 3.05],
                      [t0 - 100.0, "cancelled", "slow", "q", old],
                      [t0 - 50.0, "succeeded", "t", "q", f"{gid}.0"], [t0 + 0.04, "cancelled", "t", "q", f"{gid}.1"]))
    stopped = outcomes._answer(mid, f, t0 - 60, None, t0, cancelled_at=t0)
    assert (stopped.state, stopped.outcome, stopped.finished) == ("cancelled", "cancelled", False)
    line = controlcli.cancel_line(stopped)
    assert "already finished" not in line and line.startswith(f"{mid}: cancelled: stopped by this cancel at ")
    earlier = outcomes._answer(old, f, t0 - 60, None, t0, cancelled_at=t0)
    assert (earlier.state, earlier.outcome) == ("finished", "cancelled")
    group = outcomes._answer(gid, f, t0 - 60, None, t0, cancelled_at=t0)
    assert (group.state, group.outcome) == ("cancelled", "cancelled") and "2 of 2" in group.note
    assert outcomes._answer(mid, f, t0 - 60, None, t0).state == "finished"  # look_up without a cancel: as it was


def test_records_with_values_no_worker_writes_neither_break_the_answer_nor_its_line():
    """Anyone who may write to the events or results stream can put anything there: the CLI's line and JSON of a
    cancel (already recorded) must not raise on it (a time out of range made time.localtime raise OverflowError)."""
    a, b = workflow.new_id(), workflow.new_id()
    f = Found([a, b])
    f.on_events(Delivered(1, 1, b"", orjson.dumps({"host": {"x": 1}, "pid": True, "fields": [
        "t", "event", "task", "queue", "id", "started", "duration", "reason", "error"], "rows": [
        [1e300, "succeeded", 5, ["q"], a, None, None, {"r": 1}, "boom"]]}), False))
    f.on_results(record(b, ok=False, at=-5.0, task=[1], reason=7, error={"type": ["x"] * 1000}))
    for mid in (a, b):
        r = outcomes._answer(mid, f, 0.0, None, time.time())
        assert r.state == "finished" and r.at is None and r.task is None and r.host is None and r.pid is None
        assert isinstance(r.reason, str | None) and (r.error is None or all(isinstance(v, str)
                                                                             for v in r.error.values()))
        assert controlcli.cancel_line(r).startswith(f"{mid}: already finished: ")
        orjson.dumps(r.as_dict())
    empty = Found([a])
    empty.on_events(batch([time.time(), "cancelled", "", "q", a]))
    assert empty.final[a]["task"] is None  # a message cancelled before it was parsed: no task, not ""


def test_an_id_with_characters_json_escapes_is_still_found_in_a_batch():
    """Up to FEW ids, a batch is searched as bytes before it is parsed: the needle must be the id as JSON writes it
    (quotes, backslashes and control characters escaped), else its record is skipped and the id said not seen."""
    odd = 'order "42"\\a\n\u00e9'
    f = Found([odd])
    f.on_events(batch([time.time(), "succeeded", "t", "q", odd]))
    assert f.final[odd]["outcome"] == "succeeded"


def test_an_id_that_is_not_valid_utf8_is_refused_clearly():
    """`magne cancel` with bytes that are not UTF-8 in argv gets lone surrogates (surrogateescape): a ValueError (the
    CLI's clear error), not a TypeError from the encoder after the ids were accepted."""
    import pytest

    from magne import cancels

    with pytest.raises(ValueError, match="not a message id"):
        cancels.check_ids(["\udcff"])


def test_a_lookup_that_fails_in_any_way_answers_unknown_after_the_cancel_was_recorded(monkeypatch):
    """The cancel is recorded before the lookup: whatever the lookup raises, `magne.cancel` returns (unknown, with
    why) rather than raising as if the cancel had failed (and `magne cancel` exits 0, as its docs say)."""
    from magne import cancels

    class Pub:
        def _running(self):
            return object()

    monkeypatch.setattr(cancels, "cancel", lambda *ids, publisher: list(ids))

    def broken(*_a, **_k):
        raise KeyError("x")

    monkeypatch.setattr(outcomes, "look_up", broken)
    [r] = outcomes.cancel("m-1", publisher=Pub())
    assert r == "m-1" and r.state == "unknown" and "the lookup failed: KeyError" in r.note


def test_an_id_dated_past_now_is_read_as_one_with_no_send_time():
    """A sender whose clock runs ahead makes ids dated in the future; read from that date on, the read found nothing
    and said not-seen for a message that may have finished: such an id is read newest first, through all kept."""
    now = time.time()
    ahead = f"{int((now + 3600) * 1000):012x}7{'0' * 19}"  # an hour ahead (workflow.sent_at_ms takes up to a day)
    assert workflow.sent_at_ms(ahead) is not None
    assert len(outcomes.plan([ahead], now)) == 3
    assert outcomes._answer(ahead, Found([ahead]), now + 3540, None, now).state == "unknown"
    assert outcomes._answer(ahead, Found([ahead]), 0.0, None, now).state == "not-seen"
    soon = f"{int((now + 30) * 1000):012x}7{'0' * 19}"  # within SLACK of our clock: read from its time less SLACK
    assert outcomes.plan([soon], now)[0][0] < now


def test_the_catch_up_at_start_hands_no_ids_to_the_watchdog_and_later_cancels_all_do():
    """The catch-up read a whole window of old ids into `fresh` (the watchdog's list of ids to look for among running
    tasks): with 10,000 of them the watch was full for 5 s and the cancel of a running task made then was dropped."""
    from magne import cancels

    got = cancels.CancelSet()
    f = cancels.Follower(None, got, name="s")  # type: ignore[arg-type] - _on_body uses no client
    f._on_body(orjson.dumps({"cancel": ["old-1", "old-2"], "at": time.time()}))
    assert "old-1" in got and list(got.fresh) == []
    f._on_body(orjson.dumps({"marker": f.marker}))
    f._on_body(orjson.dumps({"cancel": ["new-1", "old-1"], "at": time.time()}))
    assert list(got.fresh) == ["new-1"]
    late = cancels.Follower(None, cancels.CancelSet(), name="s")  # type: ignore[arg-type]
    late.gave_up = True  # start() stopped waiting: the pool runs, so every cancel may name a running task
    late._on_body(orjson.dumps({"cancel": ["x"], "at": time.time()}))
    assert list(late.cancels.fresh) == ["x"]


def test_a_full_watch_makes_room_for_the_newest_cancel():
    """The watchdog looks for at most MAX_IDS fresh ids; past that it dropped the new ones, so after a flood of cancels
    the next cancel of a running task was never looked for. The oldest watched id goes instead."""
    from magne import cancels, control

    seen: list[set[str]] = []
    c = control.Control(object(), cancels.CancelSet(), dict, lambda ids, now: seen.append(set(ids)))  # type: ignore
    c.cancels.fresh.extend(f"flood-{i}" for i in range(cancels.MAX_IDS))
    c.check(1.0)
    c.cancels.fresh.append("running-one")
    c.check(1.1)
    assert "running-one" in seen[-1] and len(seen[-1]) == cancels.MAX_IDS and "flood-0" not in seen[-1]
