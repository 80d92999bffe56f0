"""Schedules (magne.schedule), limits' declarations (magne.gate) and both in magne.testing's simulated clock."""

from __future__ import annotations

import datetime as dt
import threading
import time
from types import SimpleNamespace

import pytest
from prometheus_client import CollectorRegistry, generate_latest

from magne import task
from magne.coordination import scheduler_argv
from magne.errors import RegistryError
from magne.gate import Gate, Limit, Pool, limit_of
from magne.leader import Scheduler, lock_name, tick_message
from magne.metrics import CoordinationCollector
from magne.schedule import UTC, Schedule, parse_tick_id, tick_id
from magne.schedule_status import render
from magne.testing import worker
from magne.wire import read_state
from magne.worker import Options

T0 = dt.datetime(2026, 3, 29, 0, 59, 58, tzinfo=UTC)


def test_every_is_aligned_to_the_epoch_so_every_leader_computes_the_same_due_times():
    s = Schedule("x", every=30)
    assert s.next_after(dt.datetime(2026, 1, 1, 0, 0, 10, tzinfo=UTC)) == dt.datetime(2026, 1, 1, 0, 0, 30, tzinfo=UTC)
    assert s.next_after(dt.datetime(2026, 1, 1, 0, 0, 30, tzinfo=UTC)) == dt.datetime(2026, 1, 1, 0, 1, tzinfo=UTC)
    dues = list(Schedule("x", every=0.5).due_between(T0, T0 + dt.timedelta(seconds=2)))
    assert [(d - T0).total_seconds() for d in dues] == [0.5, 1.0, 1.5, 2.0]


def test_cron_in_a_time_zone_across_a_dst_change():
    s = Schedule("x", cron="0 3 * * *", timezone="Europe/Paris")  # 29 March 2026: clocks go 02:00 -> 03:00
    assert s.next_after(T0) == dt.datetime(2026, 3, 29, 1, 0, tzinfo=UTC)  # 03:00 CEST
    assert s.next_after(s.next_after(T0)) == dt.datetime(2026, 3, 30, 1, 0, tzinfo=UTC)
    assert Schedule("x", cron="*/5 * * * *").period(T0) == 300


def test_tick_ids_name_one_due_time_and_parse_back():
    due = dt.datetime(2026, 1, 1, 12, 0, tzinfo=UTC)
    mid = tick_id("mod.report@v2", due)
    assert mid == "mod.report@v2@2026-01-01T12:00:00.000000+00:00"
    assert parse_tick_id(mid) == ("mod.report@v2", due)
    for other in ("", "abc", "x@yesterday", "@2026-01-01T12:00:00+00:00", "x@2026-01-01T12:00:00"):
        assert parse_tick_id(other) is None


@pytest.mark.parametrize("kwargs, why", [
    (dict(every=0), "every= must be"), (dict(every="5"), "every= must be"), (dict(every=float("nan")), "every="),
    (dict(cron="61 * * * *"), "not a valid cron"), (dict(cron="* * *"), "not a valid cron"),
    (dict(every=5, cron="* * * * *"), "not both"), (dict(cron="* * * * *", timezone="Mars/Olympus"), "IANA"),
    (dict(every=5, timezone="UTC"), "timezone= needs cron="),
    (dict(concurrency=0), "concurrency="), (dict(concurrency=2.5), "concurrency="), (dict(concurrency=True), "concurrency="),
    (dict(rate="10"), "rate="), (dict(rate="10/d"), "rate="), (dict(rate="0/s"), "rate="), (dict(rate=10), "rate="),
])
def test_bad_schedules_and_limits_fail_at_import_with_the_reason(kwargs, why):
    with pytest.raises(RegistryError, match=why):
        task(name="sl_bad", **kwargs)(lambda: None)


def test_a_periodic_task_must_take_no_arguments():
    with pytest.raises(RegistryError, match="requires some"):
        task(name="sl_args", every=5)(lambda x: None)
    task(name="sl_defaults", cron="0 0 1 1 *")(lambda x=1: None)


def test_limits_parse_and_name_their_pools():
    assert limit_of(None, None) is None
    assert limit_of(3, " 20 / m ") == Limit(3, (20, 60.0))
    cap, rate = Pool("Q", "cap", 3), Pool("Q", "rate", 20, 60.0)
    assert (cap.tokens, cap.filled, cap.init) == ("Q.cap.3", "Q.cap.3.filled", "Q.cap.3.init")
    assert (rate.tokens, rate.wait) == ("Q.rate.20.60000", "Q.rate.20.60000.wait")
    [decl] = cap.declarations()
    assert decl.arguments == {"x-queue-type": "classic", "x-max-length": 3, "x-overflow": "reject-publish"}
    assert rate.declarations()[1].arguments["x-dead-letter-routing-key"] == "Q.rate.20.60000"
    long = Pool("é" * 125, "cap", 3)
    assert long.tokens.startswith("magne.pool.") and len(long.filled.encode()) <= 255
    assert len(lock_name("magne.schedule", "t" * 300).encode()) <= 255


ticked: list[str] = []


@task(name="sl_every", every=10)
def sl_every():
    ticked.append("every")


@task(name="sl_cron", cron="0 * * * *")
def sl_cron():
    ticked.append("cron")


def test_testing_worker_sends_each_tick_once_with_the_leaders_id(magne_worker_start=dt.datetime(2026, 1, 1, tzinfo=UTC)):
    ticked.clear()
    with worker(start=magne_worker_start) as w:
        w.advance(3600)
        w.advance(5)
    assert ticked.count("every") == 360 and ticked.count("cron") == 1
    ids = [s.message_id for s in w.sent if s.task in ("sl_every", "sl_cron")]
    assert len(ids) == len(set(ids)) == 361
    assert "sl_cron@2026-01-01T01:00:00.000000+00:00" in ids
    cron_run = next(r for r in w.runs if r.task == "sl_cron")
    assert cron_run.at == 3600 and cron_run.outcome == "succeeded"
    header, _body = tick_message(sl_cron, dt.datetime(2026, 1, 1, 1, tzinfo=UTC), "h/1")
    assert read_state(header).message_id == "sl_cron@2026-01-01T01:00:00.000000+00:00"


running = {"now": 0, "top": 0}
guard = threading.Lock()


@task(name="sl_capped", concurrency=2)
def sl_capped(i):
    with guard:
        running["now"] += 1
        running["top"] = max(running["top"], running["now"])
    time.sleep(0.01)
    with guard:
        running["now"] -= 1


@task(name="sl_rated", rate="3/s")
def sl_rated(i):
    pass


def test_testing_worker_applies_caps_and_rates_without_failing_or_retrying():
    with worker(threads=8) as w:
        for i in range(20):
            sl_capped.send(i)
            sl_rated.send(i)
        w.join()
    assert running["top"] == 2
    assert len(w.succeeded("sl_capped")) == 20 and not w.retried and not w.dead_letters()
    starts = sorted(r.at for r in w.succeeded("sl_rated"))
    assert len(starts) == 20 and starts[-1] == 6.0  # 3 per simulated second: 0, 1, ... 6
    assert max(sum(1 for t in starts if s <= t < s + 1) for s in starts) == 3
    with worker(sync=True) as w:
        for i in range(7):
            sl_rated.send(i)
        w.join()
    assert [r.at for r in w.runs] == [0, 0, 0, 1, 1, 1, 2]


def test_coordination_metrics_read_the_scheduler_and_the_gate():
    sched = SimpleNamespace(tasks={"a": 1, "b": 2}, led={"a": None}, sent=7, skipped=1)
    gate = Gate(lambda: None, {"Q": Limit(2)}, {"Q": lambda d: None}, lambda d: None)
    gate.held[("Q", 1, 5)] = (1, 1)
    gate.queues["Q"].items.extend([object(), object(), object()])
    gate.slot_waits = 4
    reg = CollectorRegistry(auto_describe=False)
    reg.register(CoordinationCollector(lambda: (sched, gate)))
    text = generate_latest(reg).decode()
    for line in ('magne_scheduler_leader{schedule="a"} 1.0', 'magne_scheduler_leader{schedule="b"} 0.0',
                 "magne_scheduler_ticks_sent_total 7.0", 'magne_limit_slots_in_use{queue="Q"} 1.0',
                 'magne_limit_waiting{queue="Q"} 3.0', "magne_limit_slot_waits_total 4.0"):
        assert line in text, text


class _Published:
    def __init__(self):
        self.ids = []

    def publish_confirmed(self, exchange, rk, body, header):
        self.ids.append(read_state(header).message_id)


def test_a_new_leader_sends_what_is_within_the_grace_and_skips_what_is_older():
    now = dt.datetime(2026, 1, 1, 12, 0, 0, tzinfo=UTC)
    client = _Published()
    s = Scheduler(lambda: client, [sl_every], grace=25.0, clock=now.timestamp)
    s.led["sl_every"] = now - dt.timedelta(seconds=100)  # its last recorded tick was 110 s ago
    s._fire(client)
    assert client.ids == ["sl_every@2026-01-01T11:59:40.000000+00:00", "sl_every@2026-01-01T11:59:50.000000+00:00",
                          "sl_every@2026-01-01T12:00:00.000000+00:00"]
    assert s.skipped == 1 and s.sent == 3 and s.led["sl_every"] == now + dt.timedelta(seconds=10)
    s._fire(client)
    assert len(client.ids) == 3  # nothing due twice


def test_a_supervised_child_gets_the_scheduler_options():
    assert scheduler_argv(Options(["m"])) == []
    assert scheduler_argv(Options(["m"], scheduler=False, schedule_grace=9.0, schedule_stream="s")) == [
        "--no-scheduler", "--schedule-grace", "9.0", "--schedule-stream", "s"]


def test_status_renders_each_schedule_its_leader_and_next_due_times():
    lines = render([{"task": "a", "queue": "A", "schedule": "every 30s", "led": True, "last_tick": "T1",
                     "last_sent_by": "h/1", "next": ["N1", "N2"], "note": ""},
                    {"task": "b", "queue": "B", "schedule": "cron '0 * * * *'", "led": False, "last_tick": None,
                     "last_sent_by": None, "next": ["N3"], "note": "no tick recorded"}])
    assert lines[1:] == ["schedules:", "  a (every 30s, queue A): led; last tick T1 sent by h/1; next N1, N2",
                         "  b (cron '0 * * * *', queue B): NO LEADER; no tick recorded; next N3"]
    assert render([]) == []
