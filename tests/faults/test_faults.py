"""Real faults under load: the connection cut, stalled, refused, closed by the broker,
the broker restarted, the queue deleted, the worker killed. Nothing may be lost.

Each test prints a line `FAULT <name>: ...` with its figures; the README's
reliability table comes from `pytest tests/test_faults.py -s -q | grep FAULT`.
"""

from __future__ import annotations

import datetime
import re
import signal
import subprocess
import time

import orjson
import pytest

from magne import wire
from support import channels_of, connections_of, queue_counts, rabbitmqctl, runs, wait_for

N = 3000
THREADS, PREFETCH = 8, 16


def body(i: int) -> bytes:
    return wire.encode("record", [i, 0.01], None, wire.new_id())  # ~800 tasks/s: faults land mid-stream



def load(broker, names, n: int = N) -> None:
    q = names["main"]
    for i in range(n):
        broker.publish(q, q, body(i))


def reconnect_seconds(w) -> float:
    """From the worker's own records: the first connection_lost to the first reconnected."""
    lost = datetime.datetime.fromisoformat(w.events("connection_lost")[0]["time"])
    back = datetime.datetime.fromisoformat(w.events("reconnected")[0]["time"])
    return (back - lost).total_seconds()


def check_after_fault(name, w, redis, names, t_fault, n=N):
    """Every message ran, the queue is empty with nothing unacked, duplicates only from in-flight, one conn/chan."""
    wait_for(lambda: len(runs(redis, names)) == n, 180, interval=0.1, what=f"all {n} tasks after {name}")
    t_done = time.monotonic()
    wait_for(lambda: queue_counts(names["main"]) == (0, 0), 60, interval=0.5, what="queue empty, nothing unacked")
    done = runs(redis, names)
    dups = sum(v - 1 for v in done.values())
    # At the fault, at most PREFETCH deliveries were on the channel (running or waiting to be acked).
    assert dups <= PREFETCH, f"{dups} duplicates: more than were in flight at the fault"
    assert w.proc.poll() is None, "the worker must recover without a restart"
    wait_for(lambda: w.events("reconnected"), 10, what="the worker's reconnected record")
    assert len(connections_of(w.pid)) == 1
    assert channels_of(w.pid) == 1
    assert w.stop() == 0
    counters = w.counters()
    redelivered, stale = counters["redelivered"], counters["stale"]
    # --log-format json: every line the worker wrote through the fault is one JSON object.
    assert not [r for r in w.records() if "raw" in r], [r["raw"] for r in w.records() if "raw" in r][:3]
    # A task may only run twice if the broker redelivered it.
    assert dups <= redelivered
    print(f"\nFAULT {name}: messages={n} duplicates={dups} redelivered={redelivered} stale-outcomes={stale} "
          f"reconnected-after={reconnect_seconds(w):.1f}s all-done-after={t_done - t_fault:.1f}s")
    return dups


def start(start_worker, url):
    w = start_worker("--threads", str(THREADS), "--prefetch", str(PREFETCH), url=url)
    w.wait_ready()
    return w


def wait_progress(redis, names, count=N // 5):
    wait_for(lambda: len(runs(redis, names)) >= count, 60, what=f"{count} tasks before the fault")


def test_connection_cut(broker, redis, names, start_worker, proxy):
    w = start(start_worker, proxy.url("?heartbeat=2"))
    load(broker, names)
    wait_progress(redis, names)
    t = time.monotonic()
    proxy.cut()
    check_after_fault("connection cut (TCP reset mid-stream)", w, redis, names, t)


def test_connection_stalled_is_caught_by_heartbeats(broker, redis, names, start_worker, proxy):
    w = start(start_worker, proxy.url("?heartbeat=1"))
    load(broker, names)
    wait_progress(redis, names)
    t = time.monotonic()
    proxy.stall()
    # the consuming connection's loss (the control plane's connections notice the stall too, on their own)
    wait_for(lambda: any("missed heartbeats" in str(r.get("message")) for r in w.events("connection_lost")), 15,
             what="the worker to notice missed heartbeats")
    proxy.resume()
    check_after_fault("connection stalled (no bytes either way; heartbeat=1s)", w, redis, names, t)


def test_broker_refuses_for_a_while(broker, redis, names, start_worker, proxy):
    w = start(start_worker, proxy.url("?heartbeat=2"))
    load(broker, names)
    wait_progress(redis, names)
    t = time.monotonic()
    proxy.refuse()
    wait_for(lambda: len(w.events("reconnect_failed")) >= 3, 60, what="three failed reconnect attempts")
    assert w.proc.poll() is None, "a worker whose broker is away keeps trying"
    proxy.resume()
    check_after_fault("connection refused for 3 reconnect attempts", w, redis, names, t)


def test_sigterm_while_the_broker_is_away(names, start_worker, proxy):
    w = start(start_worker, proxy.url("?heartbeat=2"))
    proxy.refuse()
    wait_for(lambda: w.events("reconnect_failed"), 30, what="a failed reconnect attempt")
    w.signal(signal.SIGTERM)
    assert w.wait(15) == 0


def test_broker_closes_the_connection(broker, redis, names, start_worker):
    w = start(start_worker, "amqp://guest:guest@127.0.0.1:5672/%2F?heartbeat=5")
    load(broker, names)
    wait_progress(redis, names)
    t = time.monotonic()
    for line in rabbitmqctl("list_connections", "pid", "client_properties").splitlines():
        if f"pid={w.pid}" in line:
            rabbitmqctl("close_connection", line.split("\t")[0], "test: closed by the operator")
    check_after_fault("connection.close from the broker (rabbitmqctl close_connection)", w, redis, names, t)
    assert "closed by the operator" in w.log()


def test_queue_deleted_under_the_consumer(broker, redis, names, start_worker):
    """basic.cancel from the broker: the worker declares that queue again and consumes it, on the same
    connection and channel (the other queues' deliveries keep their tags)."""
    w = start(start_worker, "amqp://guest:guest@127.0.0.1:5672/%2F?heartbeat=5")
    broker.ch.queue_delete(names["main"])
    wait_for(lambda: f"consuming queue {names['main']} again" in w.log(), 30, what="the worker to consume it again")
    load(broker, names, 200)
    wait_for(lambda: len(runs(redis, names)) == 200, 60, what="tasks on the re-declared queue")
    log = w.log()
    assert "broker cancelled our consumer of queue" in log
    assert not w.events("connection_lost") and not w.events("reconnected")
    assert len(connections_of(w.pid)) == 1 and channels_of(w.pid) == 1
    print("\nFAULT queue deleted (basic.cancel): worker re-declared and consumed that queue, no reconnect")


@pytest.mark.reconfigures
def test_broker_restart(broker, redis, names, start_worker):
    w = start(start_worker, "amqp://guest:guest@127.0.0.1:5672/%2F?heartbeat=5")
    load(broker, names)
    wait_progress(redis, names)
    t = time.monotonic()
    try:
        rabbitmqctl("stop_app", timeout=120)
        wait_for(lambda: w.events("connection_lost"), 30, what="the worker to see the broker go")
    finally:
        rabbitmqctl("start_app", timeout=180)
        rabbitmqctl("await_startup", timeout=180)
    broker.reopen()
    check_after_fault("broker restart (rabbitmqctl stop_app / start_app)", w, redis, names, t)


def test_kill_9_loses_nothing(broker, redis, names, start_worker):
    w = start(start_worker, "amqp://guest:guest@127.0.0.1:5672/%2F")
    load(broker, names)
    wait_progress(redis, names)
    t = time.monotonic()
    w.signal(signal.SIGKILL)
    w.wait(10)
    w2 = start(start_worker, "amqp://guest:guest@127.0.0.1:5672/%2F")
    wait_for(lambda: len(runs(redis, names)) == N, 120, what="a fresh worker to finish the rest")
    wait_for(lambda: queue_counts(names["main"]) == (0, 0), 60, interval=0.5, what="queue empty")
    dups = sum(v - 1 for v in runs(redis, names).values())
    assert dups <= PREFETCH
    print(f"\nFAULT kill -9 of the worker: messages={N} duplicates={dups} "
          f"all done {time.monotonic() - t:.1f}s after the kill (by a fresh worker)")
    assert w2.stop() == 0


def test_no_fault_no_duplicates(broker, redis, names, start_worker):
    """The control: the same load with no fault has no duplicates at all."""
    w = start(start_worker, "amqp://guest:guest@127.0.0.1:5672/%2F")
    load(broker, names)
    wait_for(lambda: len(runs(redis, names)) == N, 120, what="all tasks")
    assert set(runs(redis, names).values()) == {1}
    assert w.stop() == 0
    assert w.counters()["redelivered"] == 0


def test_rabbitmqctl_available():
    assert subprocess.run(["rabbitmqctl", "-q", "status"], capture_output=True).returncode == 0


@pytest.mark.slow
@pytest.mark.reconfigures
def test_consumer_timeout_406_closes_the_channel_and_the_worker_recovers(broker, redis, names, start_worker):
    """RabbitMQ's delivery-ack timeout closes the whole channel with 406 (dramatiq #827, celery #6760).
    The broker checks it about once a minute, so this test takes a minute."""
    before = rabbitmqctl("eval", "application:get_env(rabbit, consumer_timeout).").strip()
    rabbitmqctl("eval", "application:set_env(rabbit, consumer_timeout, 1000).")
    try:
        w = start(start_worker, "amqp://guest:guest@127.0.0.1:5672/%2F?heartbeat=5")
        q = names["slow"]
        broker.publish(q, q, wire.encode("long_once", ["long", 75], None, wire.new_id()))
        wait_for(lambda: "406" in w.log(), 120, interval=0.5, what="the broker's 406 for the consumer timeout")
    finally:
        m = re.match(r"\{ok,(\d+)\}", before)
        if m:
            rabbitmqctl("eval", f"application:set_env(rabbit, consumer_timeout, {m.group(1)}).")
        else:
            rabbitmqctl("eval", "application:unset_env(rabbit, consumer_timeout).")
    wait_for(lambda: w.events("reconnected"), 30, what="the reconnect")
    # The redelivered message runs again on the new channel (the first run is still sleeping).
    wait_for(lambda: runs(redis, names).get("long") == 1, 30, what="the redelivered message to run")
    wait_for(lambda: queue_counts(q) == (0, 0), 30, interval=0.5, what="queue empty, nothing unacked")
    assert w.proc.poll() is None
    assert len(connections_of(w.pid)) == 1 and channels_of(w.pid) == 1
    print(f"\nFAULT consumer_timeout (406 PRECONDITION_FAILED closes the channel): "
          f"reconnected-after={reconnect_seconds(w):.1f}s, the message was redelivered and ran on the new channel")


def test_publishing_connection_closed_while_copies_are_in_flight(broker, redis, names, start_worker):
    """The link that carries dead-letter copies is closed by the broker mid-stream: the copies
    not yet confirmed are published again on a new link, and every original is acked once its
    copy is confirmed."""
    n = 600
    w = start(start_worker, "amqp://guest:guest@127.0.0.1:5672/%2F")
    q, dq = names["main"], names["main"] + ".dead"
    broker.publish(q, q, wire.encode("fail", ["first"], None, wire.new_id()))
    wait_for(lambda: broker.ready(dq) == 1, 30, what="the first dead letter (the link is open)")
    link = [ln.split("\t")[0] for ln in rabbitmqctl("list_connections", "pid", "client_properties").splitlines()
            if "magne worker publisher" in ln and f"pid={w.pid}" in ln]
    assert len(link) == 1
    for i in range(n):  # 8 threads x 50 ms: about 4 s of dead-letter copies
        broker.publish(q, q, wire.encode("fail", [i, 0.05], None, wire.new_id()))
    wait_for(lambda: broker.ready(dq) >= 100, 60, interval=0.02, what="copies flowing")
    rabbitmqctl("close_connection", link[0], "test: publishing link closed")
    wait_for(lambda: queue_counts(q) == (0, 0), 60, interval=0.3, what="every original acked")
    got = {orjson.loads(b)["args"][0] for _, b in broker.get_all(dq)}
    assert got == {"first", *range(n)}, f"missing dead letters: {sorted(set(range(n)) - got)[:10]}"
    log = w.log()
    assert "publishing connection failed" in log
    assert log.count("opened the publishing connection (magne worker publisher") == 2  # not the control plane's
    assert w.proc.poll() is None
    republished = re.findall(r"publishing connection failed \(.*?\): .*?; (\d+) messages wait", log)
    print(f"\nFAULT publishing connection closed mid-stream: {n} dead letters, none missing; "
          f"unconfirmed copies published again: {republished[0]}")
