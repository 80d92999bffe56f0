"""Retries, delays, dead letters you can act on; on classic and quorum queues alike."""

from __future__ import annotations

import re
import signal
import subprocess
import sys
import time

import orjson
import pytest

from magne import wire
from magne.publisher import Publisher
from support import URL, queue_counts, rabbitmqctl, runs, wait_for


@pytest.fixture(params=["classic", "quorum"])
def queue_type(request):
    return request.param



def attempts(redis, names) -> dict[str, int]:
    return {k.decode(): int(v) for k, v in redis.hgetall(f"{names['MAGNE_TEST_PREFIX']}:attempts").items()}


def publish(broker, names, func, *args):
    q = names["main"]
    broker.publish(q, q, wire.encode(func, args, None, wire.new_id()))


def magne_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "magne", *args], capture_output=True, text=True, timeout=120)


def test_task_failing_twice_then_succeeding_runs_three_times_acked_once(broker, redis, names, start_worker, queue_type):
    w = start_worker("--queue-type", queue_type)
    w.wait_ready()
    for i in range(20):
        publish(broker, names, "flaky", i)
    wait_for(lambda: len(runs(redis, names)) == 20, 60, what="every flaky task to succeed")
    assert set(attempts(redis, names).values()) == {3}
    assert set(runs(redis, names).values()) == {1}
    wait_for(lambda: queue_counts(names["main"]) == (0, 0), 20, interval=0.3, what="queue empty")
    assert broker.ready(names["main"] + ".dead") == 0
    assert w.stop() == 0
    assert w.counters()["retried"] == 40 and w.counters()["acked"] == 20


def test_task_always_failing_ends_dead_with_its_history(broker, redis, names, start_worker, queue_type):
    w = start_worker("--queue-type", queue_type)
    w.wait_ready()
    publish(broker, names, "always_fail", "x")
    publish(broker, names, "picky", "p")
    dq = names["main"] + ".dead"
    wait_for(lambda: broker.ready(dq) == 2, 60, what="both in the dead-letter queue")
    got = {orjson.loads(b)["func"]: p.headers for p, b in broker.get_all(dq)}
    h = got["always_fail"]
    assert attempts(redis, names) == {"x": 3, "p": 1}  # picky: ValueError is not in retry_on
    assert h["x-magne-reason"] == "task raised" and h["x-magne-retries"] == 2
    assert [e["attempt"] for e in h["x-magne-history"]] == [1, 2, 3]
    assert all(e["error-type"] == "ValueError" for e in h["x-magne-history"])
    assert "x is broken" in h["x-magne-error-traceback"]
    assert got["picky"]["x-magne-retries"] == 0
    wait_for(lambda: queue_counts(names["main"]) == (0, 0), 20, interval=0.3, what="queue empty")


def test_delays_wait_on_the_broker_and_a_short_one_overtakes_a_long_one(broker, redis, names, start_worker,
                                                                        queue_type):
    w = start_worker("--queue-type", queue_type)
    w.wait_ready()
    pub = Publisher(URL, queue_type=queue_type)
    try:
        sent = {}
        for name, delay in (("long", 60), ("short", 1), ("three", 3), ("now", 0)):
            sent[name] = time.time()
            pub.publish(names["main"], wire.encode("stamp", [name]), wire.properties_for(wire.new_id()),
                        delay=delay, queue_type=queue_type)
    finally:
        pub.close()
    wait_for(lambda: {"now", "short", "three"} <= set(runs(redis, names)), 30, what="the short delays")
    at = {k.decode(): float(v) for k, v in redis.hgetall(f"{names['MAGNE_TEST_PREFIX']}:at").items()}
    assert at["now"] - sent["now"] < 1.0
    assert 1.0 <= at["short"] - sent["short"] < 2.5
    assert 3.0 <= at["three"] - sent["three"] < 4.5
    assert "long" not in runs(redis, names), "the 60 s one is still waiting, on the broker"
    assert broker.ready(f"{names['main']}.wait.60000") == 1
    # Nothing waits unacked in the worker: the task queue is empty.
    assert queue_counts(names["main"]) == (0, 0)


def test_dead_letters_list_replay_and_purge(broker, redis, names, start_worker, queue_type):
    w = start_worker("--queue-type", queue_type)
    w.wait_ready()
    for i in range(3):
        publish(broker, names, "always_fail", i)
    q, dq = names["main"], names["main"] + ".dead"
    wait_for(lambda: broker.ready(dq) == 3, 60, what="three dead letters")
    out = magne_cli("dead", "list", q, "--url", URL)
    assert out.returncode == 0, out.stderr
    assert f"{dq}: 3 dead letters" in out.stdout
    assert out.stdout.count("reason='task raised'") == 3 and "ValueError: 2 is broken" in out.stdout
    assert broker.ready(dq) == 3, "listing must not consume"
    redis.set(f"{names['MAGNE_TEST_PREFIX']}:fixed", "1")
    out = magne_cli("dead", "replay", q, "--limit", "2", "--url", URL)
    assert out.returncode == 0 and "replayed 2" in out.stdout, out.stderr
    wait_for(lambda: len(runs(redis, names)) == 2, 30, what="the replayed messages to run")
    assert broker.ready(dq) == 1
    out = magne_cli("dead", "purge", q, "--url", URL)
    assert out.returncode == 0 and "purged 1" in out.stdout
    assert broker.ready(dq) == 0


def test_kill_9_between_retry_publish_and_ack_loses_nothing(broker, redis, names, start_worker):
    """Every message fails once and is retried: retry copies are published all the time, so the
    kill lands in that window for some of them. Each message must still succeed at least once."""
    n = 600
    w = start_worker("--threads", "8", "--prefetch", "32")
    w.wait_ready()
    for i in range(n):
        publish(broker, names, "flaky", i, 1)
    wait_for(lambda: len(runs(redis, names)) >= n // 4, 60, what="some progress")
    w.signal(signal.SIGKILL)
    w.wait(10)
    w2 = start_worker("--threads", "8")
    w2.wait_ready()
    wait_for(lambda: len(runs(redis, names)) == n, 120, what="every message to succeed")
    wait_for(lambda: queue_counts(names["main"]) == (0, 0), 30, interval=0.3, what="queue empty")
    assert broker.ready(names["main"] + ".dead") == 0
    assert w2.stop() == 0


@pytest.mark.reconfigures
def test_memory_alarm_blocks_the_retry_publish_but_not_the_acks(broker, redis, names, start_worker):
    before = rabbitmqctl("eval", "vm_memory_monitor:get_vm_memory_high_watermark().").strip()
    assert re.fullmatch(r"[0-9.]+", before), f"restore needs a relative watermark, broker has {before}"
    w = start_worker("--threads", "2", "--prefetch", "50")
    w.wait_ready()
    main, slow = names["main"], names["slow"]
    broker.publish(slow, slow, wire.encode("fail_in_alarm", ["held"], None, "held"))
    for i in range(40):
        broker.publish(main, main, wire.encode("record", [i, 0.1], None, wire.new_id()))
    wait_for(lambda: attempts(redis, names).get("held") == 1 and len(runs(redis, names)) >= 1, 30,
             what="the alarm task and other work to start")
    try:
        rabbitmqctl("set_vm_memory_high_watermark", "0.0000001")
        redis.set(f"{names['MAGNE_TEST_PREFIX']}:alarm", "1")  # now the task fails: its retry copy is blocked
        # RabbitMQ says connection.blocked once a connection publishes during the alarm: the publishing link.
        wait_for(lambda: "broker blocked publishing" in w.log(), 30, what="connection.blocked on the publishing link")
        # Acks go on: the other tasks finish and leave the broker while the retry is held.
        wait_for(lambda: len(runs(redis, names)) == 40, 60, what="the other tasks to finish under the alarm")
        wait_for(lambda: queue_counts(main) == (0, 0), 30, interval=0.3, what="their acks to reach the broker")
        assert queue_counts(slow) == (0, 1), "the failed message stays unacked until its retry is confirmed"
        assert "held" not in runs(redis, names)
    finally:
        rabbitmqctl("set_vm_memory_high_watermark", before)
    wait_for(lambda: "broker unblocked publishing" in w.log(), 30, what="connection.unblocked")
    wait_for(lambda: runs(redis, names).get("held") == 1, 30, what="the held retry to run")
    wait_for(lambda: queue_counts(slow) == (0, 0), 30, interval=0.3, what="queue empty")
    assert w.stop() == 0


def test_quorum_delivery_limit_dead_letters_a_message_that_keeps_killing_workers(broker, redis, names,
                                                                                 start_worker):
    from magne.topology import DEFAULT_DELIVERY_LIMIT

    q, dq = names["slow"], names["slow"] + ".dead"
    w = start_worker("--queue-type", "quorum", "--threads", "1")
    w.wait_ready()
    broker.publish(q, q, wire.encode("die", ["poison"], None, "poison"))
    starts = 1
    while broker.ready(dq) == 0:
        assert w.wait(30) == 1  # the task killed it
        assert starts <= DEFAULT_DELIVERY_LIMIT + 2, "the broker never dead-lettered the poison message"
        w = start_worker("--queue-type", "quorum", "--threads", "1")
        starts += 1
        wait_for(lambda w=w: broker.ready(dq) == 1 or w.proc.poll() is not None, 30, interval=0.05,
                 what="the next crash or the dead letter")
    runs_of_poison = int(redis.hget(f"{names['MAGNE_TEST_PREFIX']}:started", "poison"))
    assert runs_of_poison == DEFAULT_DELIVERY_LIMIT + 1
    out = magne_cli("dead", "list", q, "--url", URL)
    assert "reason='broker: delivery_limit'" in out.stdout, out.stdout + out.stderr


@pytest.mark.reconfigures
def test_unconfirmed_copies_are_published_again_when_the_publishing_connection_dies(broker, redis, names,
                                                                                   start_worker):
    """Under a memory alarm the copies wait unconfirmed on the publishing link; the broker then
    closes that link. The copies must go out again on a new link, and no original be acked early."""
    before = rabbitmqctl("eval", "vm_memory_monitor:get_vm_memory_high_watermark().").strip()
    assert re.fullmatch(r"[0-9.]+", before), f"restore needs a relative watermark, broker has {before}"
    w = start_worker("--threads", "8", "--prefetch", "50")
    w.wait_ready()
    q, dq = names["main"], names["main"] + ".dead"
    for i in range(20):
        broker.publish(q, q, wire.encode("fail", [i, 1.0], None, wire.new_id()))
    try:
        rabbitmqctl("set_vm_memory_high_watermark", "0.0000001")
        wait_for(lambda: "broker blocked publishing" in w.log(), 30, what="the link to be blocked")
        wait_for(lambda: w.log().count("dead-lettering it to") == 20, 30, what="all 20 failures")
        link = [ln.split("\t")[0] for ln in rabbitmqctl("list_connections", "pid", "client_properties").splitlines()
                if "magne worker publisher" in ln and f"pid={w.pid}" in ln]
        rabbitmqctl("close_connection", link[0], "test: blocked publishing link closed")
        wait_for(lambda: "publishing connection failed" in w.log(), 20, what="the link failure")
        assert queue_counts(q) == (0, 20), "no original may be acked before its copy is confirmed"
    finally:
        rabbitmqctl("set_vm_memory_high_watermark", before)
    wait_for(lambda: queue_counts(q) == (0, 0), 60, interval=0.3, what="every original acked")
    got = [orjson.loads(b)["args"][0] for _, b in broker.get_all(dq)]
    assert set(got) == set(range(20))
    again = int(re.findall(r"publishing connection failed \(.*?\): .*?; (\d+) messages wait", w.log())[0])
    assert again >= 1
    assert w.stop() == 0
