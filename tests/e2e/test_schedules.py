"""Fleet-wide periodic tasks on the real broker: one leader among worker processes, failover on kill -9, each due
time enqueued exactly once (docs/schedules.md)."""

from __future__ import annotations

import datetime as dt
import json
import os
import signal
import subprocess
import sys
import time

from magne.schedule import parse_tick_id
from support import ROOT, URL, wait_for


def _leaders(workers):
    return [w for w in workers if w.proc.poll() is None and w.events("leader_elected")]


def test_one_leader_failover_after_kill_9_and_no_due_time_twice_nor_skipped(broker, names, start_worker):
    prefix = names["MAGNE_TEST_PREFIX"]
    stream, ticks = f"{prefix}.schedule", f"{prefix}.ticks"
    broker.track(stream, ticks)
    broker.track_prefix(prefix)
    args = ("--threads", "1", "--queues", f"{prefix}.main", "--schedule-stream", stream)
    workers = [start_worker(*args, modules=("schedule_tasks",)) for _ in range(3)]
    for w in workers:
        w.wait_ready()
    gaps = []
    for _ in range(2):  # kill the leader twice
        wait_for(lambda: len(_leaders(workers)) == 1, 15, what="one leader")
        [leader] = _leaders(workers)
        wait_for(lambda: broker.ready(ticks) >= 2, 10, what="ticks enqueued")
        time.sleep(1.2)  # let it lead through a tick or two more
        leader.proc.send_signal(signal.SIGKILL)
        leader.proc.wait(5)
        killed = time.time()
        workers.remove(leader)
        wait_for(lambda: _leaders(workers), 10, what="a new leader")
        [new] = _leaders(workers)
        elected = dt.datetime.fromisoformat(new.events("leader_elected")[-1]["time"]).timestamp()
        gaps.append(elected - killed)
    env = {**os.environ, "MAGNE_URL": URL, "MAGNE_TEST_PREFIX": prefix, "PYTHONPATH": str(ROOT / "tests" / "support")}
    out = subprocess.run([sys.executable, "-m", "magne", "status", "schedule_tasks", "--source", "amqp", "--sample", "0",
                          "--schedule-stream", stream, "--format", "json"], capture_output=True, text=True, env=env,
                         timeout=30)
    assert out.returncode == 0, out.stderr
    [sched] = json.loads(out.stdout)["schedules"]
    assert sched["task"] == "tick" and sched["led"] is True and sched["schedule"] == "every 1s"
    assert sched["last_sent_by"].endswith(f"/{new.pid}") and len(sched["next"]) == 3
    before = broker.ready(ticks)
    wait_for(lambda: broker.ready(ticks) >= before + 2, 10, what="ticks after the second failover")
    for w in workers:
        assert w.stop() == 0
    got = [parse_tick_id(props.message_id) for props, _body in broker.get_all(ticks)]
    assert all(g is not None and g[0] == "tick" for g in got)
    dues = sorted(g[1] for g in got)
    assert len(dues) == len(set(dues)), "a due time was enqueued twice"
    steps = {(b - a).total_seconds() for a, b in zip(dues, dues[1:], strict=False)}
    assert steps == {1.0}, f"a due time was skipped: steps {steps}"
    assert len(dues) >= 6
    print(f"failover gaps (kill -9 to new leader elected): {[round(g, 2) for g in gaps]} s; {len(dues)} ticks")
    assert max(gaps) < 5.0
