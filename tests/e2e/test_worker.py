"""End to end against the real RabbitMQ: the worker as users run it, in a subprocess."""

from __future__ import annotations

import datetime
import decimal
import os
import signal
import time

import orjson
import pika

from magne import wire
from support import URL, channels_of, connections_of, queue_counts, runs, task_body, wait_for


def test_every_task_runs_exactly_once_on_one_connection_and_one_channel(broker, redis, names, start_worker):
    n = 3000
    w = start_worker("--threads", "8")
    w.wait_ready()
    for i in range(n):
        broker.publish(names["main"], names["main"], task_body("record", i))
    wait_for(lambda: len(runs(redis, names)) == n, 60, what=f"{n} tasks to run")
    assert len(connections_of(w.pid)) == 1
    assert channels_of(w.pid) == 1
    wait_for(lambda: queue_counts(names["main"]) == (0, 0), 10, what="queue empty with nothing unacked")
    assert w.stop() == 0
    assert set(runs(redis, names).values()) == {1}
    assert w.counters()["acked"] == 3000


def test_original_magne_message_from_another_client_runs(broker, redis, names, start_worker):
    w = start_worker()
    w.wait_ready()
    q = names["orig"]
    # Exactly what the original magne and any AMQP client sends: exchange NAME, key NAME, func + args.
    broker.publish(q, q, orjson.dumps({"func": names["MAGNE_TEST_ORIG"], "args": ["orig-1"]}))
    wait_for(lambda: runs(redis, names).get("orig-1") == 1, 20, what="original-format message to run")
    assert queue_counts(q) == (0, 0)


def test_bad_inputs_are_dead_lettered_with_reason_and_the_worker_keeps_going(broker, redis, names, start_worker):
    w = start_worker("--threads", "4")
    w.wait_ready()
    q = names["main"]
    weird_headers = {"nested": {"a": [1, "x", {"b": None}]}, "big": 2**40, "d": decimal.Decimal("1.5"),
                     "t": True, "when": datetime.datetime(2020, 1, 2, 3, 4, 5), "bytes": b"\x00\xff"}
    bad = {
        "json": (b"{not json", "bad message", {}),
        "array": (b"[1, 2, 3]", "bad message", {}),
        "unknown": (task_body("no_such_task", 1), "bad message", {}),
        "module-path": (orjson.dumps({"func": "os.system", "args": ["echo pwned"]}), "bad message", {}),
        "arity": (task_body("record", 1, 2, 3, 4), "wrong arguments", {}),
        "kwarg": (task_body("record", 1, nope=2), "wrong arguments", {}),
        "raises": (task_body("fail", 7), "task raised", {}),
        "huge": (b"[" + b"1," * 3_000_000 + b"1", "bad message", {}),  # 6 MB, many body frames
        "headers": (b"\x00garbage", "bad message", weird_headers),
    }
    for key, (body, _, headers) in bad.items():
        broker.publish(q, q, body, message_id=key, headers=headers or None)
    broker.publish(q, q, task_body("record", "after"))
    wait_for(lambda: runs(redis, names).get("after") == 1, 30, what="a good task after the bad ones")
    dead = q + ".dead"
    wait_for(lambda: broker.ready(dead) == len(bad), 30, what="all bad messages in the dead-letter queue")
    got = {props.message_id: (props, body) for props, body in broker.get_all(dead)}
    assert set(got) == set(bad)
    for key, (body, reason, _headers) in bad.items():
        props, dl_body = got[key]
        assert dl_body == body, key  # the original body, untouched
        assert props.headers["x-magne-reason"] == reason, key
        assert props.headers["x-magne-queue"] == q
        assert props.delivery_mode == 2
    assert got["raises"][0].headers["x-magne-error-type"] == "ValueError"
    assert "failing on purpose" in got["raises"][0].headers["x-magne-error-traceback"]
    assert "unknown task 'os.system'" in got["module-path"][0].headers["x-magne-error-message"]
    assert got["headers"][0].headers["nested"]["a"][1] == "x"  # the publisher's own headers survive
    assert queue_counts(q) == (0, 0)
    assert w.proc.poll() is None, "the worker must survive every bad message"
    log = w.log()
    assert "message raises (task fail) from queue" in log and "dead-lettering it to" in log


def test_heartbeats_flow_while_every_thread_is_busy(broker, redis, names, start_worker):
    # heartbeat=1: the broker drops a silent peer after ~2s; the pool is busy for 4s.
    w = start_worker("--threads", "2", "--prefetch", "2", url=URL.split("?")[0] + "?heartbeat=1")
    w.wait_ready()
    conn_before = connections_of(w.pid)
    for i in range(2):
        broker.publish(names["slow"], names["slow"], task_body("slow", i, 4))
    wait_for(lambda: len(runs(redis, names)) == 2, 30, what="both slow tasks")
    assert connections_of(w.pid) == conn_before
    assert "connection lost" not in w.log() and "reconnect" not in w.log()
    assert w.stop() == 0
    assert w.counters()["acked"] == 2


def test_heartbeats_keep_an_idle_worker_connected(broker, redis, names, start_worker):
    # heartbeat=1: six idle seconds are three times what the broker tolerates without traffic.
    w = start_worker("--threads", "2", url=URL.split("?")[0] + "?heartbeat=1")
    w.wait_ready()
    conn_before = connections_of(w.pid)
    time.sleep(6)  # the idle time is what is tested here, not a wait for something to happen
    assert connections_of(w.pid) == conn_before
    broker.publish(names["main"], names["main"], task_body("record", "after-idle"))
    wait_for(lambda: runs(redis, names).get("after-idle") == 1, 10, what="a task after the idle time")
    assert "connection lost" not in w.log() and "reconnect" not in w.log()


def test_sigterm_under_load_acks_finished_and_gives_back_the_rest(broker, redis, names, start_worker):
    n = 400
    q = names["slow"]
    w = start_worker("--threads", "4", "--prefetch", "20")
    w.wait_ready()
    for i in range(n):
        broker.publish(q, q, task_body("slow", i, 0.05))
    wait_for(lambda: len(runs(redis, names)) >= 40, 30, what="some tasks to finish")
    w.signal(signal.SIGTERM)
    assert w.wait(60) == 0
    done = runs(redis, names)
    assert set(done.values()) == {1}, "no task may run twice"
    started = {k.decode() for k in redis.hgetall(f"{names['MAGNE_TEST_PREFIX']}:started")}
    assert started == set(done), "every task that started also finished (warm shutdown)"
    wait_for(lambda: queue_counts(q)[1] == 0, 10, interval=0.2, what="nothing unacked")
    ready, _ = queue_counts(q)
    assert ready + len(done) == n, f"{ready} back in the queue + {len(done)} done != {n}"
    assert "stopping: consumers cancelled" in w.log()


def test_second_sigint_stops_cold_and_requeues_running_tasks(broker, redis, names, start_worker):
    q = names["slow"]
    w = start_worker("--threads", "2", "--prefetch", "2")
    w.wait_ready()
    for i in range(2):
        broker.publish(q, q, task_body("slow", i, 30))
    started_key = f"{names['MAGNE_TEST_PREFIX']}:started"
    wait_for(lambda: redis.hlen(started_key) == 2, 20, what="both tasks to start")
    w.signal(signal.SIGINT)
    wait_for(lambda: "warm shutdown" in w.log(), 10, what="warm shutdown")
    w.signal(signal.SIGINT)
    # time.sleep(30) cannot be interrupted; the cold stop closes anyway and the broker requeues.
    assert w.wait(30) == 0
    assert runs(redis, names) == {}
    # The broker requeues a closed channel's unacked messages asynchronously.
    wait_for(lambda: queue_counts(q) == (2, 0), 10, interval=0.2, what="both messages back in the queue")


def test_unreachable_broker_is_a_clear_error(tmp_path, names, start_worker):
    w = start_worker(url="amqp://guest:guest@127.0.0.1:1/%2F")
    assert w.wait(30) == 1
    log = w.log()
    assert "cannot start: cannot reach the broker at 127.0.0.1:1" in log
    assert "Traceback" not in log


def test_wrong_password_is_a_clear_error_and_never_logged(names, start_worker):
    w = start_worker(url="amqp://guest:hunter2-wrong@127.0.0.1:5672/%2F")
    assert w.wait(30) == 2  # permanent: the same exit code as any other configuration error
    log = w.log()
    assert "403" in log or "refused" in log
    assert "hunter2" not in log and "Traceback" not in log


def test_import_error_is_a_clear_error(names, start_worker):
    w = start_worker(modules=("no_such_module_xyz",))
    assert w.wait(30) == 2
    assert "cannot import task module 'no_such_module_xyz'" in w.log()


def test_task_send_publishes_confirmed(broker, redis, names, start_worker):
    from magne import configure
    from magne.registry import Task

    pub = configure(URL)
    try:
        # The worker's module has `record` on this queue; here we only need a handle to send it.
        mid = Task(lambda n: None, "record", names["main"], None).send("via-send")
        assert len(mid) == 32
    finally:
        pub.close()
    w = start_worker()
    w.wait_ready()
    wait_for(lambda: runs(redis, names).get("via-send") == 1, 20, what="the sent task to run")


def test_magne_send_cli(broker, redis, names, start_worker):
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-m", "magne", "send", "record", "--args", '["cli"]', "--declare",
                          "--queue", names["main"]], capture_output=True, text=True, timeout=60,
                         env={**os.environ, "MAGNE_URL": URL})
    assert out.returncode == 0, out.stderr
    w = start_worker()
    w.wait_ready()
    wait_for(lambda: runs(redis, names).get("cli") == 1, 20, what="the task sent by the CLI")
    bad = subprocess.run([sys.executable, "-m", "magne", "send", "record", "--args", "{oops"],
                         capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "must be JSON" in bad.stderr


def test_pika_sees_persistent_messages_from_send(broker, names):
    from magne.publisher import Publisher

    q = names["main"]
    pub = Publisher(URL)
    try:
        mid = wire.new_id()
        pub.publish(q, wire.encode("record", ["x"], None, mid), wire.properties_for(mid))
    finally:
        pub.close()
    method, props, body = broker.ch.basic_get(q, auto_ack=True)
    assert isinstance(method, pika.spec.Basic.GetOk)
    assert props.delivery_mode == 2 and props.message_id == mid and props.content_type == "application/json"
    assert orjson.loads(body) == {"func": "record", "args": ["x"], "id": mid}


def test_heartbeats_flow_during_a_warm_shutdown(broker, redis, names, start_worker):
    q = names["slow"]
    w = start_worker("--threads", "1", "--prefetch", "1", url=URL.split("?")[0] + "?heartbeat=1")
    w.wait_ready()
    broker.publish(q, q, task_body("slow", "long", 4))
    wait_for(lambda: redis.hget(f"{names['MAGNE_TEST_PREFIX']}:started", "long"), 10, what="the task to start")
    w.signal(signal.SIGTERM)
    # The warm shutdown waits 4 s for the task: twice what the broker allows a silent peer.
    assert w.wait(30) == 0
    assert runs(redis, names) == {"long": 1}
    assert w.counters()["acked"] == 1 and not w.events("connection_lost")
    wait_for(lambda: queue_counts(q) == (0, 0), 10, interval=0.2, what="queue empty")


def test_shutdown_timeout_turns_warm_into_cold(broker, redis, names, start_worker):
    q = names["slow"]
    w = start_worker("--threads", "1", "--prefetch", "1", "--shutdown-timeout", "1")
    w.wait_ready()
    broker.publish(q, q, task_body("slow", "stuck", 30))
    wait_for(lambda: redis.hget(f"{names['MAGNE_TEST_PREFIX']}:started", "stuck"), 10, what="the task to start")
    w.signal(signal.SIGTERM)
    assert w.wait(20) == 0
    assert "shutdown timeout of 1s passed; stopping cold" in w.log()
    wait_for(lambda: queue_counts(q) == (1, 0), 10, interval=0.2, what="the message back in the queue")
