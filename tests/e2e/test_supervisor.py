"""The supervisor: P processes, P connections; restarts, signals, reload."""

from __future__ import annotations

import os
import re
import signal
import time

from magne import wire
from support import connections_named, queue_counts, runs, wait_for

N = 2000



def load(broker, names, start: int, n: int, sleep: float = 0.005) -> None:
    q = names["main"]
    for i in range(start, start + n):
        broker.publish(q, q, wire.encode("record_version", [i, sleep], None, wire.new_id()))


def child_pids(log: str) -> list[int]:
    return [int(p) for p in re.findall(r"started worker process \d+ \(pid (\d+)\)", log)]


def test_two_processes_hold_exactly_two_connections(broker, redis, names, start_worker):
    w = start_worker("--processes", "2", "--threads", "4")
    wait_for(lambda: len(w.events("ready")) == 2, 30, what="two ready workers")
    wait_for(lambda: len(connections_named(names["main"])) == 2, 15, what="two connections")
    time.sleep(0.5)  # and no third one shows up
    assert len(connections_named(names["main"])) == 2
    load(broker, names, 0, 500, 0)
    wait_for(lambda: len(runs(redis, names)) == 500, 60, what="the tasks")
    w.signal(signal.SIGTERM)
    assert w.wait(60) == 0


def test_kill_9_of_a_child_under_load_restarts_it_and_loses_nothing(broker, redis, names, start_worker):
    w = start_worker("--processes", "2", "--threads", "4", "--prefetch", "8")
    wait_for(lambda: len(w.events("ready")) == 2, 30, what="two ready workers")
    load(broker, names, 0, N)
    wait_for(lambda: len(runs(redis, names)) >= N // 5, 60, what="some progress")
    victim = child_pids(w.log())[0]
    os.kill(victim, signal.SIGKILL)
    wait_for(lambda: len(child_pids(w.log())) == 3, 30, what="a replacement child")
    assert f"(pid {victim}) died (killed by SIGKILL)" in w.log()
    wait_for(lambda: len(runs(redis, names)) == N, 120, what="every task")
    wait_for(lambda: queue_counts(names["main"]) == (0, 0), 30, interval=0.5, what="queue empty")
    assert sum(v - 1 for v in runs(redis, names).values()) <= 8  # only the victim's in-flight deliveries
    wait_for(lambda: len(connections_named(names["main"])) == 2, 15, what="two connections again")
    w.signal(signal.SIGTERM)
    assert w.wait(60) == 0


def test_sighup_reloads_new_code_under_load_without_loss(broker, redis, names, start_worker, tmp_path):
    vfile = tmp_path / "version"
    vfile.write_text("v1")
    w = start_worker("--processes", "2", "--threads", "4", "--prefetch", "8",
                     env={"MAGNE_TEST_VERSION_FILE": str(vfile)})
    wait_for(lambda: len(w.events("ready")) == 2, 30, what="two ready workers")
    load(broker, names, 0, N)
    wait_for(lambda: len(runs(redis, names)) >= N // 5, 60, what="some progress")
    vfile.write_text("v2")
    w.signal(signal.SIGHUP)
    wait_for(lambda: "old worker process" in w.log() and w.log().count("stopped after reload") == 2, 60,
             what="the old workers to stop after the reload")
    load(broker, names, N, 200)
    wait_for(lambda: len(runs(redis, names)) == N + 200, 120, what="every task")
    wait_for(lambda: queue_counts(names["main"]) == (0, 0), 30, interval=0.5, what="queue empty")
    versions = {k.decode(): v.decode() for k, v in redis.hgetall(f"{names['MAGNE_TEST_PREFIX']}:version").items()}
    assert all(versions[str(i)] == "v2" for i in range(N, N + 200)), "tasks after the reload run the new code"
    assert set(runs(redis, names).values()) == {1}, "a warm reload runs nothing twice"
    wait_for(lambda: len(connections_named(names["main"])) == 2, 15, what="back to two connections")
    redis.delete(f"{names['MAGNE_TEST_PREFIX']}:version")
    w.signal(signal.SIGTERM)
    assert w.wait(60) == 0


def test_sigterm_to_the_supervisor_under_load_stops_every_child_cleanly(broker, redis, names, start_worker):
    w = start_worker("--processes", "2", "--threads", "4", "--prefetch", "8")
    wait_for(lambda: len(w.events("ready")) == 2, 30, what="two ready workers")
    load(broker, names, 0, N, 0.02)
    wait_for(lambda: len(runs(redis, names)) >= 100, 60, what="some progress")
    w.signal(signal.SIGTERM)
    assert w.wait(60) == 0
    assert len(w.events("stopped")) == 2
    assert "worker exit codes [0, 0]" in w.log()
    done = runs(redis, names)
    assert set(done.values()) == {1}
    wait_for(lambda: queue_counts(names["main"])[1] == 0, 10, interval=0.2, what="nothing unacked")
    assert queue_counts(names["main"])[0] + len(done) == N


def test_import_error_is_one_clear_error_not_a_restart_loop(names, start_worker):
    w = start_worker("--processes", "2", modules=("no_such_module_abc",))
    assert w.wait(30) == 2
    log = w.log()
    assert "cannot import task module 'no_such_module_abc'" in log
    assert "configuration error" in log
    assert len(w.events("child_started")) == 2  # no restarts


def test_crash_loop_backs_off(names, start_worker):
    w = start_worker("--processes", "2", "--threads", "1", env={"MAGNE_TEST_CRASH_AFTER": "0.2"})
    wait_for(lambda: "crash loop" in w.log(), 30, what="the crash loop to be named")
    time.sleep(4)
    # Backoff 1 s, 2 s, 4 s... : a handful of restarts in ~5 s per slot, not dozens.
    assert len(child_pids(w.log())) <= 10
    w.signal(signal.SIGTERM)
    # Exit 1 if a crashed child was still down at the stop, 0 if all were up: both are honest.
    assert w.wait(30) in (0, 1)
