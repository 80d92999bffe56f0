"""`magne worker --metrics`: scraped during real runs and checked against what happened."""

from __future__ import annotations

import os
import re
import signal

from magne import wire
from support import queue_counts, runs, task_body, unique, wait_for
from support.proxy import Proxy
from support.scrape import Scrape, metrics_url


def test_counters_match_what_happened_and_random_task_names_make_no_series(broker, redis, names, start_worker):
    n_ok, n_fail, n_unknown, n_slow = 300, 7, 5, 3
    q, slow = names["main"], names["slow"]
    w = start_worker("--threads", "4", "--metrics", "127.0.0.1:0")
    w.wait_ready()
    url = metrics_url(w)
    for i in range(n_ok):
        broker.publish(q, q, task_body("record", i))
    for i in range(n_fail):
        broker.publish(q, q, task_body("fail", i))
    randoms = [unique("random-task") for _ in range(n_unknown)]
    for name in randoms:
        broker.publish(q, q, task_body(name, 1))
    wait_for(lambda: len(runs(redis, names)) == n_ok, 60, what="the tasks")
    wait_for(lambda: Scrape(url).get("magne_messages_dead_lettered_total", queue=q, task="unknown") == n_unknown, 20,
             what="the unknown tasks dead-lettered")
    wait_for(lambda: Scrape(url).get("magne_messages_acked_total", queue=q, task="record") == n_ok, 20,
             what="acks counted")

    # During a run: three slow tasks hold three threads.
    for i in range(n_slow):
        broker.publish(slow, slow, task_body("slow", f"s{i}", 3))
    wait_for(lambda: Scrape(url).get("magne_tasks_running") == n_slow, 20, what="three tasks running")
    s = Scrape(url)
    ages = s.all("magne_task_running_seconds")
    assert len(ages) == n_slow and {lb["task"] for lb, _ in ages} == {"slow"}
    assert s.get("magne_threads_live") == 4 and s.get("magne_threads") == 4
    assert s.get("magne_connected") == 1

    assert s.get("magne_messages_acked_total", queue=q, task="record") == n_ok
    assert s.get("magne_messages_dead_lettered_total", queue=q, task="fail") == n_fail
    assert s.get("magne_messages_dead_lettered_total", queue=q, task="unknown") == n_unknown
    assert s.get("magne_messages_delivered_total", queue=q) == n_ok + n_fail + n_unknown
    assert s.get("magne_messages_delivered_total", queue=slow) == n_slow
    assert s.get("magne_messages_retried_total", queue=q, task="record") == 0
    assert s.get("magne_task_duration_seconds_count", task="record", outcome="success") == n_ok
    assert s.get("magne_task_duration_seconds_count", task="fail", outcome="dead") == n_fail
    assert s.get("magne_copy_confirm_seconds_count") == n_fail + n_unknown  # every dead letter's copy was confirmed
    assert s.get("magne_ack_batch_size_sum") == n_ok  # acks of successes go out in batches; copies' acks come singly
    assert s.get("magne_io_loop_lag_seconds_count") > 0
    assert s.get("process_cpu_seconds_total") > 0 and s.get("process_resident_memory_bytes") > 10e6
    # Bounded cardinality: no random name became a label value.
    assert not any(name in s.text for name in randoms)
    assert s.label_values("task") <= {"record", "fail", "slow", "unknown"}

    wait_for(lambda: runs(redis, names).get("s2") == 1, 20, what="the slow tasks")
    wait_for(lambda: Scrape(url).get("magne_tasks_running") == 0, 10, what="no task running")
    s = Scrape(url)
    assert s.get("magne_messages_acked_total", queue=slow, task="slow") == n_slow
    assert s.all("magne_task_running_seconds") == []
    assert w.stop() == 0
    assert w.counters()["acked"] == n_ok + n_slow


def test_retries_and_time_limits_are_counted(broker, redis, names, start_worker):
    q, slow = names["main"], names["slow"]
    w = start_worker("--threads", "2", "--metrics", "127.0.0.1:0")
    w.wait_ready()
    url = metrics_url(w)
    broker.publish(q, q, task_body("flaky", "f1", 2))  # fails twice, then succeeds
    broker.publish(slow, slow, task_body("spin", "t1"))  # past its 1 s time limit: dead-lettered
    wait_for(lambda: runs(redis, names).get("f1") == 1, 30, what="the flaky task to succeed")
    wait_for(lambda: Scrape(url).get("magne_messages_dead_lettered_total", queue=slow, task="spin") == 1, 30,
             what="the spinning task dead-lettered")
    s = Scrape(url)
    assert s.get("magne_messages_retried_total", queue=q, task="flaky") == 2
    assert s.get("magne_messages_acked_total", queue=q, task="flaky") == 1
    assert s.get("magne_messages_delivered_total", queue=q) == 3
    assert s.get("magne_task_duration_seconds_count", task="flaky", outcome="retry") == 2
    assert s.get("magne_task_duration_seconds_count", task="flaky", outcome="success") == 1
    assert s.get("magne_time_limits_total", task="spin") == 1
    assert s.get("magne_task_duration_seconds_count", task="spin", outcome="dead") == 1
    assert s.get("magne_copy_confirm_seconds_count") == 3
    assert s.get("magne_copies_pending") == 0
    assert w.stop() == 0


def test_one_reconnect_after_a_cut(broker, redis, names, start_worker):
    proxy = Proxy()
    try:
        q = names["main"]
        w = start_worker("--threads", "4", "--metrics", "127.0.0.1:0", url=proxy.url("?heartbeat=2"))
        w.wait_ready()
        url = metrics_url(w)
        for i in range(200):
            broker.publish(q, q, task_body("record", i))
        wait_for(lambda: len(runs(redis, names)) == 200, 60, what="the first tasks")
        assert Scrape(url).get("magne_reconnects_total", cause="connection_lost") == 0
        proxy.cut()
        wait_for(lambda: w.events("reconnected"), 30, what="the reconnect")
        for i in range(200, 400):
            broker.publish(q, q, task_body("record", i))
        wait_for(lambda: len(runs(redis, names)) == 400, 60, what="the tasks after the cut")
        wait_for(lambda: Scrape(url).get("magne_messages_acked_total", queue=q, task="record") == 400, 10,
                 what="every ack counted")
        s = Scrape(url)
        reconnects = s.all("magne_reconnects_total")
        assert reconnects == [({"cause": "connection_lost"}, 1.0)], reconnects
        assert s.get("magne_connected") == 1
        assert w.stop() == 0
        assert w.counters()["reconnects"] == 1
    finally:
        proxy.close()


def _child_pids(log: str) -> list[int]:
    return [int(p) for p in re.findall(r"started worker process \d+ \(pid (\d+)\)", log)]


def test_supervisor_endpoint_shows_every_process_and_survives_a_killed_child(broker, redis, names, start_worker):
    q = names["main"]
    w = start_worker("--processes", "2", "--threads", "4", "--metrics", "127.0.0.1:0")
    wait_for(lambda: len(w.events("ready")) == 2, 30, what="two ready workers")
    url = metrics_url(w)
    n = 600
    for i in range(n):
        broker.publish(q, q, wire.encode("record", [i, 0.002], None, wire.new_id()))
    wait_for(lambda: len(runs(redis, names)) == n, 60, what="the first batch")
    wait_for(lambda: Scrape(url).get("magne_messages_acked_total", queue=q, task="record", process="all") == n, 20,
             what="the supervisor's sum")
    s = Scrape(url)
    per = {p: s.get("magne_messages_acked_total", queue=q, task="record", process=p) for p in ("1", "2")}
    assert sum(per.values()) == n
    assert per["1"] > 0 and per["2"] > 0, per  # both processes took a share
    pids = {lb["process"]: int(lb["pid"]) for lb, _ in s.all("magne_worker_info")}
    assert set(pids) == {"1", "2"} and set(pids.values()) == set(_child_pids(w.log()))
    assert s.get("process_cpu_seconds_total", process="supervisor") >= 0
    assert s.get("magne_supervisor_processes") == 2

    os.kill(pids["1"], signal.SIGKILL)
    wait_for(lambda: len(_child_pids(w.log())) == 3, 30, what="a replacement child")
    wait_for(lambda: len(Scrape(url).all("magne_worker_info")) == 2
             and pids["1"] not in {int(lb["pid"]) for lb, _ in Scrape(url).all("magne_worker_info")}, 30,
             what="the new child's metrics")
    s = Scrape(url)
    # Nothing went backwards: process 1 keeps what its killed predecessor had counted, the sum too.
    assert s.get("magne_messages_acked_total", queue=q, task="record", process="1") == per["1"]
    assert s.get("magne_messages_acked_total", queue=q, task="record", process="all") == n
    assert s.get("magne_supervisor_restarts_total", process="1") == 1

    m = 400
    for i in range(n, n + m):
        broker.publish(q, q, wire.encode("record", [i, 0.002], None, wire.new_id()))
    wait_for(lambda: len(runs(redis, names)) == n + m, 60, what="the second batch")
    wait_for(lambda: queue_counts(q) == (0, 0), 20, what="queue empty")
    wait_for(lambda: Scrape(url).get("magne_messages_acked_total", queue=q, task="record", process="all") == n + m,
             20, what="every ack in the sum")
    s = Scrape(url)
    assert s.get("magne_messages_acked_total", queue=q, task="record", process="1") >= per["1"]
    assert s.get("magne_messages_delivered_total", queue=q, process="all") == n + m

    # A warm stop of the whole tree: the children leave their final counters, nothing is lost on the way out.
    w.signal(signal.SIGTERM)
    assert w.wait(60) == 0


def test_metrics_address_in_use_is_a_configuration_error(names, start_worker):
    import socket

    taken = socket.create_server(("127.0.0.1", 0))
    try:
        port = taken.getsockname()[1]
        w = start_worker("--metrics", f"127.0.0.1:{port}")
        assert w.wait(30) == 2
        assert "cannot listen there" in w.log()
    finally:
        taken.close()
