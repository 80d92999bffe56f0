"""Processes and signals (issue 20): USR1 and HUP where the README promises them, no child killed before it can
handle a stop, one child's permanent error does not stop its healthy siblings, and reloads that never finish."""

from __future__ import annotations

import os
import re
import signal
import uuid

import pika
import pytest

from magne import wire
from support import rabbitmqctl, runs, task_body, wait_for


def child_pids(w) -> list[int]:
    return [int(p) for p in re.findall(r"started worker process \d+ \(pid (\d+)\)", w.log())]


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie (dead, not yet reaped by its parent) counts as gone
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


# -- USR1, HUP ---------------------------------------------------------------------------------------------------
def test_usr1_on_the_supervisor_logs_a_status_line_and_stops_nothing(broker, redis, names, start_worker):
    w = start_worker("--processes", "2", "--threads", "2")
    wait_for(lambda: len(w.events("ready")) == 2, 30, what="two ready workers")
    kids = child_pids(w)
    w.signal(signal.SIGUSR1)  # today: the supervisor dies of it, and every child is stopped
    wait_for(lambda: w.events("supervisor_status"), 10, what="the supervisor's status line")
    [line] = w.events("supervisor_status")
    assert all(str(pid) in line["message"] for pid in kids), line["message"]
    wait_for(lambda: len(w.events("status")) == 2, 10, what="each worker process's own status line")
    assert w.proc.poll() is None and all(alive(p) for p in kids)
    q = names["main"]
    broker.publish(q, q, task_body("record", "after-usr1"))
    wait_for(lambda: runs(redis, names).get("after-usr1") == 1, 20, what="a task after USR1")
    w.signal(signal.SIGTERM)
    assert w.wait(60) == 0, w.log()


def test_sighup_on_a_single_worker_is_logged_and_the_running_task_finishes(broker, redis, names, start_worker):
    w = start_worker("--threads", "2")
    w.wait_ready()
    q = names["slow"]
    broker.publish(q, q, task_body("slow", "during-hup", 2))
    wait_for(lambda: redis.hget(f"{names['MAGNE_TEST_PREFIX']}:started", "during-hup"), 20, what="the task to start")
    w.signal(signal.SIGHUP)  # today: exit 129 (killed by SIGHUP) mid-task
    wait_for(lambda: w.events("reload_unsupported"), 10, what="the worker to say it cannot reload")
    wait_for(lambda: runs(redis, names).get("during-hup") == 1, 20, what="the running task to finish")
    assert w.proc.poll() is None
    w.signal(signal.SIGTERM)
    assert w.wait(60) == 0, w.log()


# -- a stop right after a (re)spawn ---------------------------------------------------------------------------------
@pytest.mark.parametrize("attempt", range(3))
def test_sigterm_right_after_the_children_start_stops_them_all_and_exits_0(names, start_worker, attempt):
    w = start_worker("--processes", "2", "--threads", "1")
    wait_for(lambda: len(child_pids(w)) == 2, 20, interval=0.005, what="both children started")
    w.signal(signal.SIGTERM)  # the children are still importing: today they die of it and the supervisor exits 1
    assert w.wait(60) == 0, w.log()
    assert "killed by SIGTERM" not in w.log()


def test_sigterm_right_after_a_respawn_exits_0(names, start_worker):
    w = start_worker("--processes", "2", "--threads", "1")
    wait_for(lambda: len(w.events("ready")) == 2, 30, what="two ready workers")
    os.kill(child_pids(w)[0], signal.SIGKILL)
    wait_for(lambda: len(child_pids(w)) == 3, 20, interval=0.005, what="the replacement child")
    w.signal(signal.SIGTERM)
    assert w.wait(60) == 0, w.log()
    assert "killed by SIGTERM" not in w.log()


# -- one child's permanent error -------------------------------------------------------------------------------------
@pytest.fixture
def own_vhost():
    """A vhost and a user of this test's own (rabbitmqctl), guest allowed too (to publish), removed afterwards."""
    tag = uuid.uuid4().hex[:8]
    vhost, user, password = f"magne-test-vh-{tag}", f"magne-test-user-{tag}", f"pw-{tag}"
    rabbitmqctl("add_vhost", vhost)
    try:
        rabbitmqctl("add_user", user, password)
        for who in (user, "guest"):
            rabbitmqctl("set_permissions", "-p", vhost, who, ".*", ".*", ".*")
        yield {"vhost": vhost, "user": user, "url": f"amqp://{user}:{password}@127.0.0.1:5672/{vhost}",
               "guest_url": f"amqp://guest:guest@127.0.0.1:5672/{vhost}"}
    finally:
        try:
            rabbitmqctl("delete_user", user)
        finally:
            rabbitmqctl("delete_vhost", vhost)


def test_a_permanent_error_of_a_child_that_was_healthy_is_retried_while_its_sibling_serves(redis, names, start_worker,
                                                                                           own_vhost):
    w = start_worker("--processes", "2", "--threads", "2", url=own_vhost["url"])
    wait_for(lambda: len(w.events("ready")) == 2, 30, what="two ready workers")
    rabbitmqctl("clear_permissions", "-p", own_vhost["vhost"], own_vhost["user"])
    os.kill(child_pids(w)[0], signal.SIGKILL)
    wait_for(lambda: w.events("child_permanent_error"), 30, what="the restarted child's permanent error, logged loudly")
    assert w.proc.poll() is None, w.log()  # today: the supervisor stops the healthy child too, and exits 2
    survivor = child_pids(w)[1]
    assert alive(survivor)
    conn = pika.BlockingConnection(pika.URLParameters(own_vhost["guest_url"]))
    try:
        ch = conn.channel()
        q = names["main"]
        ch.basic_publish(q, q, wire.encode("record", ["while-refused"], None, wire.new_id()),
                         pika.BasicProperties(delivery_mode=2))
        wait_for(lambda: runs(redis, names).get("while-refused") == 1, 20, what="the healthy sibling to keep serving")
        rabbitmqctl("set_permissions", "-p", own_vhost["vhost"], own_vhost["user"], ".*", ".*", ".*")
        wait_for(lambda: len(w.events("ready")) == 3, 60, what="the retried child to start once allowed again")
    finally:
        conn.close()
    w.signal(signal.SIGTERM)
    assert w.wait(60) == 0, w.log()


def test_a_permanent_error_at_the_first_start_still_stops_the_supervisor(names, start_worker, own_vhost):
    rabbitmqctl("clear_permissions", "-p", own_vhost["vhost"], own_vhost["user"])
    w = start_worker("--processes", "2", url=own_vhost["url"])
    assert w.wait(30) == 2, w.log()
    assert len(w.events("child_started")) == 2 and w.events("child_config_error")


# -- readiness timeout and reloads --------------------------------------------------------------------------------------
def test_a_reload_into_code_that_hangs_at_import_times_out_and_the_next_sighup_reloads(broker, redis, names,
                                                                                     start_worker, tmp_path):
    hang = tmp_path / "hang"
    hang.write_text("ok")
    w = start_worker("--processes", "2", "--threads", "2", "--ready-timeout", "3",
                     env={"MAGNE_TEST_HANG_FILE": str(hang)})
    wait_for(lambda: len(w.events("ready")) == 2, 30, what="two ready workers")
    old = child_pids(w)
    hang.write_text("hang")
    w.signal(signal.SIGHUP)
    wait_for(lambda: w.events("reload_failed"), 30, what="the reload to fail at its readiness timeout")
    assert w.events("child_not_ready") and "3s" in w.events("child_not_ready")[0]["message"]
    hung = child_pids(w)[2:]
    wait_for(lambda: not any(alive(p) for p in hung), 10, what="the hung new children to be killed")
    assert all(alive(p) for p in old)  # the old code keeps serving
    q = names["main"]
    broker.publish(q, q, task_body("record", "between-reloads"))
    wait_for(lambda: runs(redis, names).get("between-reloads") == 1, 20, what="a task on the old code")
    hang.write_text("ok")
    w.signal(signal.SIGHUP)  # today: "reload already in progress; ignoring SIGHUP", forever
    wait_for(lambda: w.events("reload_ready"), 30, what="the second reload to finish")
    wait_for(lambda: not any(alive(p) for p in old), 30, what="the old children to stop after the reload")
    w.signal(signal.SIGTERM)
    assert w.wait(60) == 0, w.log()


def test_a_child_that_hangs_at_its_first_import_is_killed_and_reported(names, start_worker, tmp_path):
    hang = tmp_path / "hang"
    hang.write_text("hang")
    w = start_worker("--processes", "2", "--threads", "1", "--ready-timeout", "2",
                     env={"MAGNE_TEST_HANG_FILE": str(hang)})
    wait_for(lambda: len(w.events("child_not_ready")) >= 2, 30, what="both children to miss their readiness timeout")
    hang.write_text("ok")
    wait_for(lambda: len(w.events("ready")) == 2, 60, what="the restarted children, now importing fine")
    w.signal(signal.SIGTERM)
    assert w.wait(60) == 0, w.log()


def test_a_thread_started_at_import_in_a_supervised_child_does_not_inherit_blocked_signals(redis, names, start_worker):
    w = start_worker("--processes", "2", "--threads", "1", env={"MAGNE_TEST_RECORD_MASK": "1"})
    wait_for(lambda: len(w.events("ready")) == 2, 30, what="two ready workers")
    key = f"{names['MAGNE_TEST_PREFIX']}:mask"
    try:
        masks = {k.decode(): v.decode() for k, v in redis.hgetall(key).items()}
        assert set(masks) == {"1", "2"}
        assert not any("SIGTERM" in m or "SIGINT" in m for m in masks.values()), masks  # its helpers must stop
    finally:
        redis.delete(key)
    w.signal(signal.SIGTERM)
    assert w.wait(60) == 0, w.log()
