"""dramatiq and celery messages run by `magne worker --accept ...`, produced by the real packages (issue 24).

The producers are dramatiq's RabbitmqBroker and celery's default AMQP transport (kombu), pointed at the test
broker, so what is checked is what a team switching to magne has in its queues: the queues those frameworks
declare (magne must declare them identically, or either side gets a 406), their message bodies and headers.
The magne side is a real `magne worker` subprocess with tests/support/migration_tasks.py.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import dramatiq
import orjson
import pytest
from celery import Celery
from dramatiq.brokers.rabbitmq import RabbitmqBroker

from support import URL, queue_counts, rabbitmqctl, runs, wait_for

MODULES = ("migration_tasks",)
CELERY_URL = URL.replace("%2F", "/")


@pytest.fixture
def q(names, broker):
    """The test's dramatiq queue (with .DQ, .XQ and magne's delay queues) and celery queue, deleted at the end."""
    prefix = names["MAGNE_TEST_PREFIX"]
    dram, cel = f"{prefix}.dram", f"{prefix}.cel"
    broker.track(dram, cel)
    broker.track_prefix(prefix)
    return {"dram": dram, "cel": cel, "dq": f"{dram}.DQ", "xq": f"{dram}.XQ", "cdead": f"{cel}.dead"}


@pytest.fixture
def rb():
    b = RabbitmqBroker(url=URL)
    yield b
    b.close()


@pytest.fixture
def capp():
    app = Celery("mig", broker=CELERY_URL)
    app.conf.broker_connection_retry_on_startup = True
    yield app
    app.close()


def actor(rb, q, name: str, fn=None):
    return dramatiq.actor(fn or (lambda *a, **k: None), actor_name=name, queue_name=q["dram"], broker=rb)


def dead_letters(broker, queue: str) -> list[tuple[dict, bytes]]:
    return [(dict(p.headers or {}), body) for p, body in broker.get_all(queue)]


def mworker(start_worker, *args: str):
    w = start_worker(*args, modules=MODULES)
    w.wait_ready()
    return w


# -- dramatiq ----------------------------------------------------------------------------------------------

def test_dramatiq_messages_run_as_they_are(broker, redis, names, q, rb, start_worker):
    """Plain, delayed (.DQ), retries already spent, a refused pipeline and an unknown actor, on one worker."""
    record, flaky = actor(rb, q, "mig.record"), actor(rb, q, "mig.flaky")
    nope = actor(rb, q, "mig.nope")
    for i in range(10):
        record.send(i)  # dramatiq declares its queues first; magne's must be identical
    w = mworker(start_worker, "--accept", "dramatiq", "--queues", q["dram"])
    record.send_with_options(args=(20,), kwargs={"sleep": 0.0})
    due = time.time() + 1.5
    record.send_with_options(args=(30,), delay=1500)
    flaky.send_with_options(args=(40,), retries=3)  # 3 spent of the task's 3: dead-lettered at its first failure
    flaky.send_with_options(args=(41,), retries=2)  # one retry left
    dramatiq.pipeline([record.message(50), record.message(51)], broker=rb).run()
    nope.send(60)
    wait_for(lambda: all(runs(redis, names).get(str(i)) == 1 for i in [*range(10), 20]), 10, what="plain messages")
    # The delayed message waits on the broker (magne's delay queue), never unacked in the worker.
    wait_for(lambda: queue_counts(q["dq"]) == (0, 0), 5, what="the .DQ message moved to a delay queue")
    assert "30" not in runs(redis, names)
    wait_for(lambda: runs(redis, names).get("30") == 1, 10, what="the delayed message, when due")
    assert float(redis.hget(f"{names['MAGNE_TEST_PREFIX']}:at", "30")) >= due - 0.05
    wait_for(lambda: broker.ready(q["xq"]) == 4, 10, what="four dead letters in dramatiq's .XQ")
    attempts = {k.decode(): int(v) for k, v in redis.hgetall(f"{names['MAGNE_TEST_PREFIX']}:attempts").items()}
    assert attempts == {"40": 1, "41": 2}
    dead = {orjson.loads(b)["message_id"]: h for h, b in dead_letters(broker, q["xq"])}
    reasons = sorted(h["x-magne-error-message"][:40] for h in dead.values())
    assert sum("options.pipe_target" in r for r in reasons) == 1, reasons
    assert sum("unknown dramatiq actor 'mig.nope'" in r for r in reasons) == 1, reasons
    retries = sorted(h["x-magne-retries"] for h in dead.values() if h["x-magne-task"] == "mig.flaky")
    assert retries == [3, 3]
    assert w.proc.poll() is None and not w.events("start_failed")
    assert queue_counts(q["dram"]) == (0, 0)
    # dramatiq's producer declares again on a fresh broker: the arguments magne declared are dramatiq's.
    rb2 = RabbitmqBroker(url=URL)
    try:
        actor(rb2, q, "mig.record").send(70)
    finally:
        rb2.close()
    wait_for(lambda: runs(redis, names).get("70") == 1, 10, what="a message after dramatiq redeclared the queue")


def test_dramatiq_and_magne_workers_share_a_queue(broker, redis, names, q, rb, start_worker):
    """The old workers and magne consume the same queue at once: every message runs exactly once."""
    key, old_key = names["MAGNE_TEST_KEY"], f"{names['MAGNE_TEST_PREFIX']}:old"

    def old_run(n, sleep=0.0):
        time.sleep(sleep)
        redis.hincrby(key, str(n), 1)
        redis.hincrby(old_key, "runs", 1)

    record = actor(rb, q, "mig.record", old_run)
    old = dramatiq.Worker(rb, worker_threads=2, worker_timeout=100)
    old.start()
    try:
        w = mworker(start_worker, "--accept", "dramatiq", "--queues", q["dram"], "--threads", "2", "--prefetch", "2")
        for i in range(120):
            record.send(i, sleep=0.01)
        wait_for(lambda: len(runs(redis, names)) == 120, 20, what="all 120 messages")
        time.sleep(0.3)  # a duplicate would show up now: runs are recorded as they finish
    finally:
        old.stop()
    counts = runs(redis, names)
    assert set(counts.values()) == {1}, {k: v for k, v in counts.items() if v != 1}
    by_old = int(redis.hget(old_key, "runs") or 0)
    assert 0 < by_old < 120, by_old  # both sides ran some
    assert w.proc.poll() is None
    redis.delete(old_key)


def test_kill_9_of_magne_loses_no_dramatiq_message(broker, redis, names, q, rb, start_worker):
    record = actor(rb, q, "mig.record")
    w = mworker(start_worker, "--accept", "dramatiq", "--queues", q["dram"], "--threads", "4", "--prefetch", "4")
    for i in range(40):
        record.send(i, sleep=0.1)
    wait_for(lambda: len(runs(redis, names)) >= 8, 10, what="some runs before the kill")
    w.proc.send_signal(signal.SIGKILL)
    w.proc.wait()
    w2 = mworker(start_worker, "--accept", "dramatiq", "--queues", q["dram"], "--threads", "8")
    wait_for(lambda: len(runs(redis, names)) == 40, 20, what="every message after the kill")
    counts = runs(redis, names)
    assert sum(counts.values()) - 40 <= 4, counts  # only what was running (prefetch 4) may run twice
    wait_for(lambda: queue_counts(q["dram"]) == (0, 0), 5, what="the queue empty")
    assert w2.proc.poll() is None


# -- celery ------------------------------------------------------------------------------------------------

def test_celery_messages_run_as_they_are(broker, redis, names, q, capp, start_worker):
    """Plain, countdown, expires, retries spent, time limit, and the refused ones, on one worker."""
    w = mworker(start_worker, "--accept", "celery", "--queues", q["cel"])
    send = capp.send_task
    cel = q["cel"]
    ids = [send("mig.crecord", args=[i], queue=cel).id for i in range(5)]  # celery declares the queue magne made
    send("mig.crecord", args=[10], kwargs={"sleep": 0.0}, queue=cel, task_id="cel-id-10")
    due = time.time() + 1.5
    send("mig.crecord", args=[20], queue=cel, countdown=1.5)
    # Expires before it is due: celery 5 also sets the AMQP expiration (1 s), so it expires in magne's delay queue,
    # whose dead-letter route brings it back to the queue, where magne dead-letters it as expired.
    send("mig.crecord", args=[30], queue=cel, countdown=2, expires=1)
    send("mig.cflaky", args=[40], queue=cel, retries=2)  # both of the task's 2 retries spent already
    send("mig.cslow", args=[50], queue=cel, soft_time_limit=0.5, time_limit=5)
    send("mig.crecord", args=[60], queue=cel, link=capp.signature("mig.crecord", args=[61]))
    send("mig.crecord", args=[62], queue=cel, serializer="pickle")
    send("mig.crecord", args=[63], queue=cel, compression="gzip")
    send("mig.nope", args=[64], queue=cel)
    wait_for(lambda: all(runs(redis, names).get(str(i)) == 1 for i in [0, 1, 2, 3, 4, 10]), 10, what="plain")
    assert "20" not in runs(redis, names)
    wait_for(lambda: runs(redis, names).get("20") == 1, 10, what="the countdown message, when due")
    assert float(redis.hget(f"{names['MAGNE_TEST_PREFIX']}:at", "20")) >= due - 0.05
    wait_for(lambda: broker.ready(q["cdead"]) == 7, 10, what="seven dead letters in magne's .dead")
    dead = dead_letters(broker, q["cdead"])
    by_reason: dict[str, list[str]] = {}
    for h, _b in dead:
        by_reason.setdefault(h["x-magne-reason"], []).append(h["x-magne-error-message"])
    assert len(by_reason["expired"]) == 1 and "expires" in by_reason["expired"][0]
    assert len(by_reason["time limit"]) == 1 and "0.5s" in by_reason["time limit"][0]
    assert len(by_reason["task raised"]) == 1
    refused = " | ".join(by_reason["bad message"])
    for field in ("embed.callbacks", "content_type", "compression", "unknown celery task 'mig.nope'"):
        assert field in refused, refused
    attempts = {k.decode(): int(v) for k, v in redis.hgetall(f"{names['MAGNE_TEST_PREFIX']}:attempts").items()}
    assert attempts == {"40": 1}
    assert "30" not in runs(redis, names) and "61" not in runs(redis, names) and "50" not in runs(redis, names)
    send("mig.crecord", args=[99], queue=cel)  # the worker went on
    wait_for(lambda: runs(redis, names).get("99") == 1, 10, what="a message after the refused ones")
    assert ids and w.proc.poll() is None


def test_celery_and_magne_workers_share_a_queue(broker, redis, names, q, capp, start_worker, tmp_path):
    """A celery worker (which declares its queue on start: it must take magne's declaration) and magne consume the
    same queue at once: every message runs exactly once."""
    old_key = f"{names['MAGNE_TEST_PREFIX']}:old"
    w = mworker(start_worker, "--accept", "celery", "--queues", q["cel"], "--threads", "2", "--prefetch", "2")
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1] / "support"), "MAGNE_TEST_CELERY_URL": CELERY_URL,
           "MAGNE_TEST_PREFIX": names["MAGNE_TEST_PREFIX"], "MAGNE_TEST_KEY": names["MAGNE_TEST_KEY"]}
    log = open(tmp_path / "celery.log", "w")
    old = subprocess.Popen([sys.executable, "-m", "celery", "-A", "migration_celery", "worker", "-P", "threads", "-c",
                            "2", "--without-gossip", "--without-mingle", "--without-heartbeat", "-l", "WARNING"],
                           env=env, stdout=log, stderr=subprocess.STDOUT, cwd=tmp_path)
    try:
        wait_for(lambda: consumers(q["cel"]) >= 2, 20, 0.1, what="the celery worker consuming")
        for i in range(120):
            capp.send_task("mig.crecord", args=[i], kwargs={"sleep": 0.01}, queue=q["cel"])
        wait_for(lambda: len(runs(redis, names)) == 120, 20, what="all 120 messages")
        time.sleep(0.3)  # a duplicate would show up now: runs are recorded as they finish
    finally:
        old.kill()  # everything ran (celery's warm stop takes 10 s here); what it held unacked would go back
        old.wait()
        log.close()
    counts = runs(redis, names)
    assert set(counts.values()) == {1}, {k: v for k, v in counts.items() if v != 1}
    by_old = int(redis.hget(old_key, "runs") or 0)
    assert 0 < by_old < 120, (by_old, (tmp_path / "celery.log").read_text()[-2000:])
    assert w.proc.poll() is None
    redis.delete(old_key)


def consumers(queue: str) -> int:
    for line in rabbitmqctl("list_queues", "name", "consumers").splitlines():
        name, _, n = line.partition("\t")
        if name == queue:
            return int(n)
    return 0


# -- forged messages ---------------------------------------------------------------------------------------

DEEP = b"[" * 100_000 + b"]" * 100_000


def forged_dramatiq(q: str) -> list[bytes]:
    base = {"queue_name": q, "actor_name": "mig.record", "args": [1], "kwargs": {}, "options": {},
            "message_id": "x", "message_timestamp": 0}
    bad = [{"actor_name": 7}, {"actor_name": ""}, {"actor_name": "x" * 5000}, {"args": "1"}, {"kwargs": []},
           {"options": []}, {"options": {"eta": "soon"}}, {"options": {"eta": 10**30}}, {"options": {"retries": -1}},
           {"options": {"retries": 10**20}}, {"options": {"time_limit": 0}}, {"options": {"time_limit": 1e300}},
           {"message_id": ["x"]}, {"queue_name": {}}, {"options": {"on_failure": "mig.record"}}]
    out = [json.dumps({**base, **b}).encode() for b in bad]  # the standard library writes 10**30 as it is
    out += [b'{"actor_name": "mig.record", "args": ' + DEEP + b"}", DEEP, b"\x80\x04not json", b'{"no": "func"}']
    return out


def nested(depth: int) -> dict:
    out: dict = {}
    for _ in range(depth):
        out = {"a": out}
    return out


def test_forged_messages_are_dead_lettered_and_the_worker_goes_on(broker, redis, names, q, rb, capp, start_worker):
    """Forged fields of both formats (wrong types, huge values, missing fields, deep nesting): each is
    dead-lettered with a reason, none crashes or wedges the worker, and good messages after them run."""
    w = mworker(start_worker, "--accept", "dramatiq,celery", "--queues", q["dram"], q["cel"],
                "--dramatiq-queues", q["dram"])
    dram_bad = forged_dramatiq(q["dram"])
    for body in dram_bad:
        broker.publish("", q["dram"], body)
    good = {"callbacks": None, "errbacks": None, "chain": None, "chord": None}
    cel_bad = [
        ({"task": 5, "id": "a"}, [[1], {}, good]),
        ({"id": "b"}, [[1], {}, good]),
        ({"task": "mig.crecord", "timelimit": "x"}, [[1], {}, good]),
        ({"task": "mig.crecord", "timelimit": [10**15, None]}, [[1], {}, good]),
        ({"task": "mig.crecord", "timelimit": [[[[1]]], None], "eta": nested(100)}, [[1], {}, good]),
        ({"task": nested(100)}, [[1], {}, good]),
        ({"task": "mig.crecord", "eta": "not a date"}, [[1], {}, good]),
        ({"task": "mig.crecord", "expires": 12}, [[1], {}, good]),
        ({"task": "mig.crecord", "retries": "2"}, [[1], {}, good]),
        ({"task": "mig.crecord"}, [[1], {}, good, 4]),
        ({"task": "mig.crecord"}, ["1", {}, good]),
        ({"task": "mig.crecord"}, [[1], {}, "embed"]),
        ({"task": "mig.crecord"}, [[1], {}, {"chord": {"task": "x"}}]),
    ]
    for headers, body in cel_bad:
        broker.publish("", q["cel"], orjson.dumps(body), headers=headers, content_type="application/json")
    wait_for(lambda: broker.ready(q["xq"]) == len(dram_bad), 15, what="every forged dramatiq message in .XQ")
    wait_for(lambda: broker.ready(q["cdead"]) == len(cel_bad), 15, what="every forged celery message in .dead")
    reasons = [h["x-magne-error-message"] for h, _b in dead_letters(broker, q["xq"]) + dead_letters(broker, q["cdead"])
               if h["x-magne-reason"] == "bad message"]
    assert len(reasons) == len(dram_bad) + len(cel_bad)
    if os.environ.get("MAGNE_TEST_SHOW_LOGS"):
        print("\n".join(reasons))
    named = [r for r in reasons if "field" in r or "property" in r or "header" in r]
    assert len(named) >= len(reasons) - 5, reasons  # all but the unreadable bodies and the one without 'func' name it
    assert not runs(redis, names)
    actor(rb, q, "mig.record").send(1)
    capp.send_task("mig.crecord", args=[2], queue=q["cel"])
    wait_for(lambda: runs(redis, names) == {"1": 1, "2": 1}, 10, what="good messages after the forged ones")
    assert w.proc.poll() is None and not w.events("crashed")


def test_dead_list_reads_dramatiq_xq(broker, q, rb, start_worker):
    mworker(start_worker, "--accept", "dramatiq", "--queues", q["dram"])
    actor(rb, q, "mig.nope").send(1)
    wait_for(lambda: broker.ready(q["xq"]) == 1, 10, what="the dead letter in .XQ")
    env = {**os.environ, "MAGNE_URL": URL}
    out = subprocess.run([sys.executable, "-m", "magne", "dead", "list", q["xq"]], capture_output=True, text=True,
                         timeout=30, env=env)
    assert out.returncode == 0, out.stderr
    assert "1 dead letter" in out.stdout and "unknown dramatiq actor" in out.stdout, out.stdout

