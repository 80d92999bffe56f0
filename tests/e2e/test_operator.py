"""What an operator meets on day one: commands that fail clearly and the same way, logs that cannot be
forged, dead letters shown safely, a supervisor that stops on permanent errors."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import orjson
import pytest

from magne import wire
from support import URL, rabbitmqctl, runs, task_body, wait_for

ENV = {**os.environ, "MAGNE_URL": URL}


def magne(*args: str, env: dict[str, str] | None = None, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "magne", *args], capture_output=True, text=True, timeout=timeout,
                          env=env or ENV)


def queue_exists(name: str) -> bool:
    return name in rabbitmqctl("list_queues", "name").split()


def exchange_exists(name: str) -> bool:
    return name in rabbitmqctl("list_exchanges", "name").split()


def test_send_to_a_queue_that_does_not_exist_creates_nothing_and_says_how(broker, names):
    q = f"{names['MAGNE_TEST_PREFIX']}.typo"
    broker.track(q)
    out = magne("send", "no_such_task", "--queue", q)
    assert out.returncode == 2, out.stderr
    assert "does not exist" in out.stderr and "--declare" in out.stderr and "Traceback" not in out.stderr
    assert not queue_exists(q) and not queue_exists(q + ".dead") and not exchange_exists(q)


def test_send_declares_a_quorum_queue_the_worker_then_accepts(broker, redis, names, start_worker):
    q = names["main"]
    out = magne("send", "record", "--args", '["q1"]', "--queue", q, "--declare", "--queue-type", "quorum")
    assert out.returncode == 0, out.stderr
    assert "quorum" in rabbitmqctl("list_queues", "name", "type").split(q + "\t")[1].split("\n")[0]
    w = start_worker("--queue-type", "quorum")
    w.wait_ready()  # no 406 inequivalent arg: send declared what the worker declares
    wait_for(lambda: runs(redis, names).get("q1") == 1, 20, what="the task sent before the worker ran")
    out = magne("send", "record", "--args", '["q2"]', "--queue", q)  # exists now: no --declare needed
    assert out.returncode == 0, out.stderr
    wait_for(lambda: runs(redis, names).get("q2") == 1, 20, what="the second task")


@pytest.mark.parametrize("cmd", [["send", "x", "--queue", "x"], ["dead", "list", "x"], ["worker", "e2e_tasks"]])
def test_exit_codes_are_the_same_across_commands(cmd, names):
    env = {**ENV, "PYTHONPATH": os.path.join(os.path.dirname(__file__), "..", "support"),
           **{k: v for k, v in names.items() if k.startswith("MAGNE_")}}
    bad_scheme = magne(*cmd, env={**env, "MAGNE_URL": "http://guest:guest@127.0.0.1:5672/"})
    assert bad_scheme.returncode == 2, bad_scheme.stderr
    assert "amqp:// or amqps://" in bad_scheme.stderr and "Traceback" not in bad_scheme.stderr
    refused = magne(*cmd, env={**env, "MAGNE_URL": "amqp://guest:hunter2@127.0.0.1:5672/no-such-vhost"})
    assert refused.returncode == 2, refused.stderr
    assert "hunter2" not in refused.stderr
    unreachable = magne(*cmd, env={**env, "MAGNE_URL": "amqp://guest:guest@127.0.0.1:1/%2F"})
    assert unreachable.returncode == 1, unreachable.stderr
    assert "cannot reach the broker" in unreachable.stderr and "Traceback" not in unreachable.stderr


def test_password_in_url_argument_warns(names):
    out = magne("send", "x", "--queue", f"{names['MAGNE_TEST_PREFIX']}.none", "--url", URL)
    assert "put the URL in MAGNE_URL" in out.stderr
    assert "guest:guest" not in out.stderr


def test_a_task_name_cannot_forge_log_lines(broker, names, start_worker):
    w = start_worker(log_format="text")
    w.wait_ready()
    q = names["main"]
    evil = "x\n2026-01-01 00:00:00,000 ERROR [1 magne-io] magne.io: FORGED LINE\x1b[31m"
    broker.publish(q, q, orjson.dumps({"func": evil, "args": []}), message_id="id\nFORGED ID LINE")
    wait_for(lambda: broker.ready(q + ".dead") == 1, 20, what="the dead letter")
    log = w.log()
    assert "unknown task" in log
    assert not [ln for ln in log.splitlines() if ln.startswith(("2026-01-01", "FORGED"))], log
    assert "\x1b" not in log and "\\n2026-01-01" in log


def test_dead_list_shows_binary_bodies_and_odd_headers_safely(broker, names, start_worker):
    q = names["main"]
    w = start_worker()
    w.wait_ready()
    dq = q + ".dead"
    body = b"\x00\xff\x1b[2J\n" + bytes(range(256)) * 4
    broker.publish(q, q, body, message_id="bin")
    wait_for(lambda: broker.ready(dq) == 1, 20, what="the binary body dead-lettered")
    # Dead letters that a broker or another tool wrote, with headers of unexpected shapes.
    broker.publish("", dq, b"{}", headers={"x-death": "not a list", "x-magne-history": [{"at": "yesterday"}, 7]})
    broker.publish("", dq, b"{}", headers={"x-death": [{"reason": "rejected\nFORGED"}], "x-magne-task": "t\x1b[31m"})
    out = magne("dead", "list", q, "--newest", "5")
    assert out.returncode == 0, out.stderr
    assert f"({len(body)} bytes)" in out.stdout
    assert "\x1b" not in out.stdout and "\x00" not in out.stdout
    assert not [ln for ln in out.stdout.splitlines() if ln.startswith("FORGED")]
    assert "3 dead letters" in out.stdout


def test_dead_replay_goes_only_to_the_queue_the_dead_letters_belong_to(broker, redis, names, start_worker):
    q, other = names["main"], names["slow"]
    dq = q + ".dead"
    w = start_worker("--queues", q)
    w.wait_ready()
    broker.ch.queue_declare(other, durable=True)  # not consumed: a misrouted replay would stay here
    broker.publish("", dq, task_body("record", "replayed"), headers={"x-magne-queue": other})
    out = magne("dead", "replay", q)
    assert out.returncode == 0 and "replayed 1" in out.stdout, out.stderr
    wait_for(lambda: runs(redis, names).get("replayed") == 1, 20, what="the replayed message on its own queue")
    assert broker.ready(other) == 0


def test_supervisor_stops_on_an_unknown_vhost_instead_of_restarting(names, start_worker):
    w = start_worker("--processes", "2", url="amqp://guest:guest@127.0.0.1:5672/no-such-vhost")
    assert w.wait(30) == 2
    assert len(w.events("child_started")) == 2  # no restart loop
    assert w.events("child_config_error")


def test_sigterm_while_a_child_waits_for_its_restart_exits_0(names, start_worker):
    w = start_worker("--processes", "2", env={"MAGNE_TEST_CRASH_AFTER": "1.0", "MAGNE_TEST_CRASH_SLOT": "1"})
    wait_for(lambda: w.events("child_died"), 30, what="a child to die and wait for its restart")
    w.signal(signal.SIGTERM)
    assert w.wait(60) == 0, w.log()


def test_sighup_then_sigterm_is_not_a_failed_reload(names, start_worker):
    w = start_worker("--processes", "2")
    wait_for(lambda: len(w.events("ready")) == 2, 30, what="two ready workers")
    w.signal(signal.SIGHUP)
    w.signal(signal.SIGTERM)
    assert w.wait(60) == 0, w.log()
    assert not w.events("reload_failed"), w.log()


def test_json_log_lines_all_parse(broker, names, start_worker):
    q = names["main"]
    w = start_worker()
    w.wait_ready()
    broker.publish(q, q, task_body("fail", 1))
    broker.publish(q, q, b"not json")
    wait_for(lambda: broker.ready(q + ".dead") == 2, 20, what="two dead letters")
    assert w.stop() == 0
    records = w.records()
    assert records and not [r for r in records if "raw" in r], [r for r in records if "raw" in r][:3]
    dead = [r for r in records if r.get("event") == "dead_letter"]
    assert {r["reason"] for r in dead} == {"task raised", "bad message"}
    assert all({"time", "level", "pid", "thread", "queue", "outcome"} <= r.keys() for r in dead)


def test_send_cli_publishes_exact_big_integers(broker, redis, names, start_worker):
    out = magne("send", "record", "--args", "[18446744073709551616]", "--queue", names["main"], "--declare")
    assert out.returncode == 0, out.stderr
    w = start_worker()
    w.wait_ready()
    wait_for(lambda: runs(redis, names).get("18446744073709551616") == 1, 20, what="the exact big integer")
    assert wire  # the body format under test is magne.wire's


def test_send_with_module_reads_the_tasks_queue(broker, redis, names, start_worker):
    w = start_worker()
    w.wait_ready()
    env = {**ENV, "PYTHONPATH": os.path.join(os.path.dirname(__file__), "..", "support"),
           **{k: v for k, v in names.items() if k.startswith("MAGNE_")}}
    out = magne("send", "record", "--module", "e2e_tasks", "--args", '["via-module"]', env=env)
    assert out.returncode == 0, out.stderr  # today: "unrecognized arguments: --module"
    wait_for(lambda: runs(redis, names).get("via-module") == 1, 20, what="the task sent to the queue its module names")
    unknown = magne("send", "no_such_task", "--module", "e2e_tasks", env=env)
    assert unknown.returncode == 2 and "no_such_task" in unknown.stderr and "record" in unknown.stderr, unknown.stderr
    assert "--module" in magne("send", "--help").stdout
