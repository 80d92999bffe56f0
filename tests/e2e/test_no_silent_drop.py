"""Issue 20, "Nothing dropped in silence" and the worker's sockets: regression tests against the real broker.

Delayed messages and retry copies meeting a full queue, a dead-letter queue that refuses copies, drop-head
limits, magne's log records when magne is a library, and a helper process forked by a task holding the
worker's socket. A delayed message or retry copy falls due into `<queue>.due` (magne.topology), never into
the full task queue itself.

Limits are set with RabbitMQ policies scoped to the test's exact queue name (the worker's own declarations
still match), cleared at the end; the tasks are in tests/support/silent_tasks.py; runs are counted in Redis.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import textwrap
import time
import types
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pika
import pytest

from support import ROOT, URL, rabbitmqctl, runs, wait_for


def target(name: str, queue: str) -> Any:
    """A task by name and queue (the worker runs it from tests/support/silent_tasks.py), for Publisher.send."""
    return types.SimpleNamespace(name=name, queue=queue, queue_type=None, priority=None, max_priority=None)


def queue_messages(prefix: str) -> dict[str, int]:
    """Messages in every queue whose name starts with `prefix`, from the broker."""
    out = {}
    for line in rabbitmqctl("list_queues", "name", "messages").splitlines():
        parts = line.split("\t")
        if len(parts) == 2 and parts[0].startswith(prefix):
            out[parts[0]] = int(parts[1])
    return out


def dead_lettered(broker: Any, queue: str, message_id: str) -> bool:
    """Whether `queue`.dead holds message `message_id` with a reason that names `queue` (a copy read and dropped)."""
    try:
        got = broker.get_all(f"{queue}.dead")
    except pika.exceptions.ChannelClosedByBroker:
        broker.reopen()
        return False
    return any(p.message_id == message_id and queue in json.dumps(p.headers or {}, default=str) for p, _ in got)


@pytest.fixture
def policy() -> Iterator[Any]:
    """policy(queue, definition): a policy applied to exactly that queue, cleared at the end of the test."""
    made: list[str] = []

    def set_policy(queue: str, definition: dict[str, Any]) -> None:
        name = f"{queue}-policy"
        rabbitmqctl("set_policy", "--apply-to", "queues", "--priority", "100", name, f"^{re.escape(queue)}$",
                    json.dumps(definition))
        made.append(name)

    yield set_policy
    for name in made:
        try:
            rabbitmqctl("clear_policy", name)
        except RuntimeError:
            pass


def wait_policy(queue: str, timeout: float = 10) -> None:
    """Until the broker applies a policy to `queue` (which exists)."""
    def applied() -> bool:
        for line in rabbitmqctl("list_queues", "name", "policy").splitlines():
            parts = line.split("\t")
            if len(parts) == 2 and parts[0] == queue and parts[1]:
                return True
        return False
    wait_for(applied, timeout, interval=0.3, what=f"the policy on {queue}")


def warnings_of(w: Any) -> list[str]:
    """The worker's warning and error records, each as one JSON text."""
    return [json.dumps(r) for r in w.records() if str(r.get("level", "")).lower() in ("warning", "error", "critical")
            or "raw" in r]


# -- H: a delayed message or a retry copy meeting a full queue is never lost in silence ---------------------
FULL = {"max-length": 1, "overflow": "reject-publish"}


def ran_or_dead(broker: Any, redis: Any, names: dict[str, str], queue: str, arg: str, mid: str, what: str) -> None:
    """Wait until the run of `arg` happened once, or its message was dead-lettered naming `queue`; fail saying
    where every message of the test is."""
    try:
        wait_for(lambda: runs(redis, names).get(arg) == 1 or dead_lettered(broker, queue, mid), 20,
                 what=f"{what} to run (or be dead-lettered with a reason naming its full queue)")
    except AssertionError as exc:
        raise AssertionError(f"{exc}; runs {runs(redis, names)}, queues "
                             f"{queue_messages(names['MAGNE_TEST_PREFIX'])}") from None
    assert runs(redis, names).get(arg, 0) <= 1


def test_a_delayed_message_meeting_a_full_queue_runs_once_there_is_room(broker, redis, names, pub, policy,
                                                                          start_worker):
    p = names["MAGNE_TEST_PREFIX"]
    q = f"{p}.full"
    broker.track(q)
    pub.send(target("record", q), ("filler",))  # declares the queue as the worker does; it now holds one message
    policy(q, FULL)
    wait_policy(q)
    mid = pub.send(target("record", q), ("delayed",), delay=1)  # confirmed: it waits on the broker
    time.sleep(3)  # the delay runs out while the queue is full (the broker's timer: nothing to observe)
    w = start_worker(modules=("silent_tasks",))
    w.wait_ready()
    wait_for(lambda: runs(redis, names).get("filler") == 1, 20, what="the filler to run")
    ran_or_dead(broker, redis, names, q, "delayed", mid, "the delayed message")


def test_a_retry_copy_meeting_a_full_queue_runs_once_there_is_room(broker, redis, names, pub, policy, start_worker):
    p = names["MAGNE_TEST_PREFIX"]
    q = f"{p}.full"
    broker.track(q)
    w = start_worker(modules=("silent_tasks",))
    w.wait_ready()
    policy(q, FULL)
    wait_policy(q)
    mid = pub.send(target("fail_once", q), ("retried",))
    wait_for(lambda: redis.hget(f"{p}:attempts", "retried") == b"1", 20, what="the first attempt")
    failed_at = time.monotonic()
    w.signal(signal.SIGTERM)  # no worker while the retry copy waits (about 5 s)
    assert w.wait(20) == 0, w.log()
    delays = {k: v for k, v in queue_messages(p).items() if ".wait." in k}
    assert sum(delays.values()) == 1, f"the retry copy is not waiting in a delay queue: {delays}\n{w.log()}"
    pub.send(target("record", q), ("filler",))  # the queue is full now
    time.sleep(max(0.0, failed_at + 7 - time.monotonic()))  # the backoff runs out meanwhile (the broker's timer)
    w2 = start_worker(modules=("silent_tasks",))
    w2.wait_ready()
    wait_for(lambda: runs(redis, names).get("filler") == 1, 20, what="the filler to run")
    ran_or_dead(broker, redis, names, q, "retried", mid, "the retry copy")


# -- I: a dead-letter queue that refuses copies never makes a failed task run again ---------------------------
def test_a_dead_letter_queue_that_refuses_copies_never_reruns_the_task(broker, redis, names, pub, policy,
                                                                        start_worker):
    p = names["MAGNE_TEST_PREFIX"]
    q = f"{p}.deadfull"
    dead = f"{q}.dead"
    broker.track(q)
    policy(dead, FULL)
    w = start_worker(modules=("silent_tasks",))
    w.wait_ready()
    wait_policy(dead)
    broker.publish("", dead, b"filler")  # the dead-letter queue is full: it refuses (nacks) every copy
    mid = pub.send(target("always_fails", q), ("x",))
    wait_for(lambda: redis.hget(f"{p}:attempts", "x"), 20, what="the task's first run")
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:  # 20 s: today the second run comes about 6 s after the first
        attempts = int(redis.hget(f"{p}:attempts", "x") or 0)
        assert attempts == 1, f"the task's body ran {attempts} times: its failure was only waiting to be recorded\n{w.log()}"
        time.sleep(0.2)
    said = [r for r in warnings_of(w) if mid in r and dead in r]
    assert said, f"no warning naming message {mid} and the dead-letter queue {dead}:\n{w.log()}"


# -- J: drop-head limits are warned about --------------------------------------------------------------------
DROP_HEAD = {"max-length": 1000, "overflow": "drop-head"}


def _management_answers() -> bool:
    import urllib.request

    try:
        urllib.request.urlopen("http://127.0.0.1:15672/api/overview", timeout=2)  # 401 without a login: it answers
    except urllib.error.HTTPError:
        return True
    except OSError:
        return False
    return True


@pytest.fixture
def management() -> Iterator[None]:
    """The management API, which is where policies show (AMQP does not): enabled for the test if it is off, and
    disabled again afterwards."""
    enabled = False
    if not _management_answers():
        subprocess.run(["rabbitmq-plugins", "enable", "--online", "rabbitmq_management"], capture_output=True,
                       timeout=120, check=True)
        enabled = True
        wait_for(_management_answers, 60, what="the management API")
    try:
        yield
    finally:
        if enabled:
            subprocess.run(["rabbitmq-plugins", "disable", "--online", "rabbitmq_management"], capture_output=True,
                           timeout=120)


@pytest.mark.reconfigures
def test_magne_send_declare_warns_of_a_drop_head_limit(broker, names, pub, policy, management):
    q = f"{names['MAGNE_TEST_PREFIX']}.full"
    broker.track(q)
    pub.send(target("record", q), ("first",))  # the magne queue exists
    policy(q, DROP_HEAD)
    wait_policy(q)
    out = subprocess.run([sys.executable, "-m", "magne", "send", "record", "--queue", q, "--declare", "--args", '["j"]'],
                         capture_output=True, text=True, timeout=60, env={**os.environ, "MAGNE_URL": URL})
    assert out.returncode == 0, out.stderr
    assert "drop-head" in (out.stdout + out.stderr).lower(), f"no warning:\n{out.stdout}\n{out.stderr}"


@pytest.mark.reconfigures
def test_the_worker_warns_of_a_drop_head_limit_on_its_queue(broker, names, policy, start_worker, management):
    q = f"{names['MAGNE_TEST_PREFIX']}.full"
    broker.track(q)
    policy(q, DROP_HEAD)  # applies when the worker declares the queue
    w = start_worker(modules=("silent_tasks",))
    w.wait_ready()
    wait_for(lambda: [r for r in warnings_of(w) if "drop-head" in r.lower()], 10,
             what=f"a warning about drop-head on {q}")


# -- K: magne's own log records reach the application's handlers when magne is a library ---------------------
LIBRARY_SCRIPT = textwrap.dedent('''
    """A plain application: logging.basicConfig, a Publisher, a broker connection that goes away."""
    import json, logging, os, sys, time
    import magne
    from magne import hooks
    from support.proxy import Proxy

    class Keep(logging.Handler):
        def __init__(self):
            super().__init__()
            self.messages = []
        def emit(self, record):
            self.messages.append(record.getMessage())

    logging.basicConfig(level=logging.INFO)
    keep = Keep()
    logging.getLogger().addHandler(keep)

    def noop(*args):
        pass

    task = magne.task(name="library_" + str(os.getpid()), queue=sys.argv[2])(noop)

    def until(cond, timeout):
        deadline = time.monotonic() + timeout
        while not cond() and time.monotonic() < deadline:
            time.sleep(0.05)
        return bool(cond())

    def connection_lost_seen():
        proxy = Proxy()
        pub = magne.Publisher(proxy.url(), confirm_timeout=10)
        try:
            pub.send(task, (1,))
            proxy.cut()
            return until(lambda: any("connection lost" in m for m in keep.messages), 10)
        finally:
            proxy.close()
            pub.close()

    def hook_failures(rounds, per_round):
        """Records at a gentle pace: rounds of failing before_send hooks (each logs once), each round waiting until
        the handler caught up (when no record ever reaches it, the rounds go on without waiting)."""
        pub = magne.Publisher(os.environ["MAGNE_URL"])
        seen = lambda: sum("hook" in m and "raised" in m for m in keep.messages)
        for r in range(rounds):
            added = []
            for i in range(per_round):
                def before_send(self, message):
                    raise RuntimeError("hook failing on purpose")
                added.append(hooks.add(type(f"Failing{r}_{i}", (hooks.Hook,), {"before_send": before_send})()))
            pub.send(task, (r,))
            for h in added:
                hooks.remove(h)
            until(lambda: seen() >= (r + 1) * per_round, 5 if r == 0 else 10 if seen() else 0)
        pub.close()
        return seen()

    mode = sys.argv[1]
    if mode == "lost":
        print(json.dumps({"seen": connection_lost_seen()}))
    elif mode == "fork":
        parent = connection_lost_seen()
        pid = os.fork()
        if pid == 0:
            keep.messages.clear()
            os._exit(0 if connection_lost_seen() else 1)
        _, status = os.waitpid(pid, 0)
        print(json.dumps({"parent": parent, "child": os.waitstatus_to_exitcode(status) == 0}))
    else:
        print(json.dumps({"records": hook_failures(24, 500)}))
    sys.stdout.flush()
''')


@pytest.fixture
def library(tmp_path: Path, broker: Any, names: dict[str, str]) -> Any:
    """library(mode): run LIBRARY_SCRIPT in a fresh interpreter; its JSON answer and its stderr."""
    script = tmp_path / "app.py"
    script.write_text(LIBRARY_SCRIPT)
    q = names["main"]
    broker.track(q)

    def run(mode: str) -> tuple[dict[str, Any], str]:
        env = {**os.environ, "MAGNE_URL": URL, "PYTHONPATH": f"{ROOT / 'tests'}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
        out = subprocess.run([sys.executable, str(script), mode, q], capture_output=True, text=True, timeout=150,
                             env=env, cwd=tmp_path)
        assert out.returncode == 0, out.stderr[-3000:]
        return json.loads(out.stdout.strip().splitlines()[-1]), out.stderr

    return run


def test_a_library_user_sees_publisher_connection_lost_in_its_handler(library):
    got, stderr = library("lost")
    assert got["seen"], f"no 'publisher connection lost' record reached the application's handler:\n{stderr[-2000:]}"


def test_a_forked_child_of_a_library_user_sees_its_own_records(library):
    got, stderr = library("fork")
    assert got == {"parent": True, "child": True}, stderr[-2000:]


def test_a_library_user_gets_every_record_and_no_false_stuck_line(library):
    got, stderr = library("flood")
    assert "stuck" not in stderr, [line for line in stderr.splitlines() if "stuck" in line]
    assert got["records"] == 24 * 500


# -- N: a process forked by a task does not keep the worker's connection alive ----------------------------------
def test_a_helper_forked_by_a_task_does_not_delay_redelivery_after_kill_9(broker, redis, names, pub, start_worker):
    p = names["MAGNE_TEST_PREFIX"]
    q = f"{p}.forks"
    broker.track(q)
    w = start_worker(modules=("silent_tasks",))
    w.wait_ready()
    pub.send(target("fork_and_block", q), (1,))
    helper = int(wait_for(lambda: redis.hget(f"{p}:helpers", "1"), 20, what="the task to fork its helper"))
    try:
        assert broker.ready(q) == 0  # taken by the worker, unacked
        os.kill(w.pid, signal.SIGKILL)
        w.proc.wait(10)
        killed = time.monotonic()
        wait_for(lambda: broker.ready(q) == 1, 15, interval=0.1, what="the unacked message to come back")
        took = time.monotonic() - killed
        assert took < 3.0, f"the message came back {took:.1f}s after kill -9"
    finally:
        try:
            os.kill(helper, signal.SIGKILL)
        except ProcessLookupError:
            pass
        redis.delete(f"{p}:helpers")
