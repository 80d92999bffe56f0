"""Review of the finished-id lookup (magne.outcomes) on the real broker: a message this very cancel stopped is said
stopped or not seen, never "already finished"; a read ends at a marker of its own (under steady traffic it never ended
before its deadline); a consume whose consume-ok came too late leaves no consumer behind (the lookup gives each read a
short timeout, and a leaked stream consumer would stay subscribed for the process's life)."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time

import orjson
import pika
import pytest
from pamqp import commands

import magne
from magne import cancels, events, workflow
from magne.amqp import names as amqp_names
from magne.amqp.errors import BrokerTimeout
from magne.outgoing import Target
from support import ROOT, URL, wait_for

MODULES = ("control_tasks",)


def started(redis, fleet, n):
    return redis.hget(f"{fleet['MAGNE_TEST_PREFIX']}:started", str(n)) == b"1"


def test_a_running_and_a_prefetched_message_this_cancel_stopped_are_said_stopped_not_already_finished(
        fleet, pub, redis, start_worker):
    """The worker records `cancelled` for both a moment after the cancel: the lookup reads those records, and used to
    answer "already finished: cancelled ... the cancel is recorded anyway" for messages that were running or waiting
    when the cancel came."""
    main = fleet["main"]
    w = start_worker("--threads", "1", modules=MODULES)
    w.wait_ready()
    running = pub.send(Target("nap", main), [1, 30], message_id=workflow.new_id())
    waiting = pub.send(Target("note", main), [2], message_id=workflow.new_id())  # prefetched behind it
    wait_for(lambda: started(redis, fleet, 1), 15, what="the nap started")
    got = magne.cancel(running, waiting, publisher=pub)
    # Stopped (its record read) or not seen finished (the read reached the lookup's marker first): never "finished"
    assert all(r.state in ("cancelled", "not-seen") and not r.finished for r in got), [r.as_dict() for r in got]
    assert all(r.pid == w.pid and r.task in ("nap", "note") for r in got if r.state == "cancelled")

    again = pub.send(Target("nap", main), [3, 30], message_id=workflow.new_id())
    wait_for(lambda: started(redis, fleet, 3), 15, what="the second nap started")
    env = {**os.environ, "MAGNE_URL": URL, **{k: v for k, v in fleet.items() if k.startswith("MAGNE_")}}
    out = subprocess.run([sys.executable, "-m", "magne", "cancel", again], capture_output=True, text=True, timeout=60,
                         env=env, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith(f"{again}: cancelled: "), out.stdout
    assert "already finished" not in out.stdout
    assert redis.hget(f"{fleet['MAGNE_TEST_PREFIX']}:runs", "2") is None  # none of them ran to its end
    assert w.stop() == 0


def test_a_consume_given_up_on_for_its_timeout_leaves_no_consumer(broker, pub, names):
    """Client.consume raised BrokerTimeout and kept the subscription: its caller never learns the tag, so the consumer
    stayed for the life of the client (and was subscribed again after each reconnect)."""
    queue = names["main"]
    broker.ch.queue_declare(queue, durable=True)
    broker.track(queue)
    client = pub._running()
    client.submit(lambda: time.sleep(1.0))  # the loop is busy: the consume-ok cannot come within the timeout
    with pytest.raises(BrokerTimeout):
        client.consume(queue, lambda m: None, timeout=0.3)
    barrier = threading.Event()
    client.submit(barrier.set)  # runs after the subscribe (and the cancel, if any) the consume submitted
    assert barrier.wait(5)
    assert not any(s.queue == queue for s in client.session.subs.values())
    ok = client.call(amqp_names.QueueDeclare(queue=queue, passive=True), commands.Queue.DeclareOk)
    assert ok.consumer_count == 0  # the broker took the consume and then its cancel, in order, before this


def test_a_lookup_under_steady_event_traffic_reads_up_to_now_and_says_not_seen(fleet, pub):
    """Traffic of a batch of events every 100 ms (a fleet at work): the read never saw IDLE seconds of quiet, and a record
    dated `until` (now + SKEW) came only at the deadline, so every id not found came back "unknown: no task events
    read within the deadline", after the whole deadline. The lookup appends a marker and ends its read there."""
    stream = fleet["MAGNE_EVENTS_STREAM"]
    events.declare(pub._running(), stream)
    stop = threading.Event()

    def busy() -> None:
        conn = pika.BlockingConnection(pika.URLParameters(URL))
        ch = conn.channel()
        fields = ["t", "event", "task", "queue", "id"]
        while not stop.is_set():
            rows = [[time.time(), "succeeded", "t", "q", workflow.new_id()] for _ in range(5)]
            ch.basic_publish("", stream, orjson.dumps({"host": "h", "pid": 1, "fields": fields, "rows": rows}))
            conn.sleep(0.05)
        conn.close()

    writer = threading.Thread(target=busy, daemon=True)
    writer.start()
    try:
        mid = workflow.new_id()
        seen: list[int] = []
        tag = events.follow(pub._running(), lambda batch: seen.append(len(batch)), time.time() - 60, stream)
        wait_for(lambda: len(seen) >= 3, 10, what="steady traffic under way")  # it runs on for the whole lookup
        pub._running().cancel(tag)
        t0 = time.monotonic()
        [r] = magne.cancel(mid, publisher=pub)
        took = time.monotonic() - t0
    finally:
        stop.set()
        writer.join(5)
    assert r.state == "not-seen", r.as_dict()
    assert took < 1.5, took


def test_a_running_task_cancelled_just_after_a_start_that_read_many_old_cancels_is_interrupted(
        fleet, pub, redis, start_worker):
    """The catch-up at start handed every id of the retention window to the watchdog's watch (at most MAX_IDS, kept
    5 s): after 10,000 old cancels, a cancel of a running task made in the worker's first seconds was dropped, and the
    task ran to its end."""
    old = [f"old-{i}" for i in range(cancels.MAX_IDS)]
    cancels.cancel(*old, publisher=pub)
    w = start_worker("--threads", "1", modules=MODULES)
    w.wait_ready()
    running = pub.send(Target("nap", fleet["main"]), [1, 30], message_id=workflow.new_id())
    wait_for(lambda: started(redis, fleet, 1), 15, what="the nap started")
    os.kill(w.pid, signal.SIGUSR1)  # its status line comes after a watchdog tick: the catch-up's ids are watched by then
    wait_for(lambda: w.events("status"), 10, what="a watchdog tick after the start")
    cancels.cancel(running, publisher=pub)  # within the 5 s those ids are watched
    wait_for(lambda: w.events("cancel_running"), 4, what=f"the running task interrupted:\n{w.log()}")
    assert w.stop() == 0
