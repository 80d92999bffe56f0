"""Hooks, metrics and status without a broker: the parts that can be checked in-process."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry, Counter, Gauge, generate_latest, start_http_server
from prometheus_client.parser import text_string_to_metric_families

from magne import hooks, metrics, status, task
from magne.amqp.errors import BrokerTimeout, ChannelClosed, ConnectionClosed, ConnectionLost
from magne.errors import ConfigError
from magne.io.loop import loss_cause
from magne.io.stats import Tally
from magne.testing import worker

ROOT = Path(__file__).resolve().parents[2]


@task
def ob_ok(x):
    return x


@task(max_retries=2, min_backoff=1, max_backoff=2)
def ob_flaky(key):
    ob_attempts[key] = ob_attempts.get(key, 0) + 1
    if ob_attempts[key] <= 2:
        raise ConnectionError(f"attempt {ob_attempts[key]}")


@task
def ob_broken(x):
    raise ValueError("always")


ob_attempts: dict[str, int] = {}


class Recorder(hooks.Hook):
    def __init__(self) -> None:
        self.events: list[tuple] = []
        self.lock = threading.Lock()

    def _add(self, *ev: object) -> None:
        with self.lock:
            self.events.append(ev)

    def before_task(self, run: hooks.TaskRun) -> None:
        run.state["t0"] = True
        self._add("before", run.task_name, run.args, run.retries)

    def after_success(self, run: hooks.TaskRun) -> None:
        assert run.state["t0"] and run.duration >= 0 and run.started > 0
        self._add("success", run.task_name, run.decision, run.message_id is not None)

    def after_failure(self, run: hooks.TaskRun) -> None:
        self._add("failure", run.task_name, run.decision, run.reason, type(run.exception).__name__,
                  run.delay > 0, run.task is None)

    def on_dead_letter(self, run: hooks.TaskRun) -> None:
        self._add("dead", run.task_name, run.reason)


@pytest.fixture
def recorder():
    r = hooks.add(Recorder())
    yield r
    hooks.remove(r)


@pytest.mark.parametrize("threads", [0, 2])
def test_hooks_see_every_run_and_its_decision(recorder, threads):
    ob_attempts.clear()
    with worker(threads=threads) as w:
        ob_ok.send(1)
        ob_flaky.send("k")
        ob_broken.send(2)
        w.join()
    ev = sorted(recorder.events, key=repr)
    assert ("success", "ob_ok", "success", True) in ev
    assert ev.count(("before", "ob_flaky", ["k"], 0)) == 1
    assert ("before", "ob_flaky", ["k"], 2) in ev
    assert ev.count(("failure", "ob_flaky", "retry", "task raised", "ConnectionError", True, False)) == 2
    assert ("success", "ob_flaky", "success", True) in ev
    assert ("failure", "ob_broken", "dead", "task raised", "ValueError", False, False) in ev
    assert ("dead", "ob_broken", "task raised") in ev
    assert len([e for e in ev if e[0] == "before"]) == 5


def test_a_message_naming_no_task_reaches_after_failure_and_on_dead_letter(recorder):
    from magne import wire
    from magne.publisher import default_publisher

    with worker(threads=0) as w:
        mid = wire.new_id()
        default_publisher().publish("OB_OK", wire.encode("no_such_task", [], {}, mid), wire.properties_for(mid))
        w.join()
    assert recorder.events == [("failure", "no_such_task", "dead", "bad message", "BadMessage", False, True),
                               ("dead", "no_such_task", "bad message")]


class Exploding(hooks.Hook):
    def before_task(self, run):
        raise RuntimeError("boom before")

    def after_success(self, run):
        raise KeyboardInterrupt  # even a BaseException is contained

    def after_failure(self, run):
        raise RuntimeError("boom after")

    def on_dead_letter(self, run):
        raise RuntimeError("boom dead")


def test_a_failing_hook_changes_no_outcome_and_is_logged():
    h = hooks.add(Exploding())
    try:
        with worker(threads=2) as w:
            ob_ok.send(5)
            ob_broken.send(6)
            w.join()
        assert [r.task for r in w.succeeded(ob_ok)] == ["ob_ok"]
        assert [r.reason for r in w.dead_letters(ob_broken)] == ["task raised"]
        assert hooks._failures  # counted (and logged, rate-limited)
    finally:
        hooks.remove(h)
        hooks._failures.clear()


def test_before_send_adds_headers_and_without_hooks_the_header_is_the_hand_made_one():
    from magne import publisher, wire
    from magne.amqp.codec import decode_properties

    class Stamp(hooks.Hook):
        def before_send(self, message):
            message.headers["x-stamp"] = f"{message.task_name}@{message.queue}"

    from magne.outgoing import task_header

    target = publisher.Target("ob_ok", "OB_OK")
    assert task_header(target, "m-1", 20) == publisher.json_header("m-1", 20)
    h = hooks.add(Stamp())
    try:
        stamped = task_header(target, "m-2", 20)
    finally:
        hooks.remove(h)
    props = decode_properties(stamped)
    assert props.headers == {"x-stamp": "ob_ok@OB_OK"}
    assert (props.message_id, props.content_type, props.delivery_mode) == ("m-2", wire.CONTENT_TYPE, 2)
    assert hooks.SEND_HOOKS == []


def test_metrics_off_imports_no_prometheus_client():
    code = (
        "import sys\n"
        "from magne import cli, hooks, registry, worker, publisher, testing\n"
        "from magne.registry import task\n"
        "t = task(name='x')(lambda: None)\n"
        "w = worker.Worker(worker.Options(modules=['m']), {'x': t})\n"
        "assert not w.pool.hooks, 'no hooks: the pool runs its plain path'\n"
        "assert w.io.stats.tally is None\n"
        "bad = [m for m in sys.modules if m.startswith(('prometheus_client', 'opentelemetry', 'magne.metrics'))]\n"
        "assert not bad, bad\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 0, out.stderr


def test_task_metrics_bounds_labels_and_sums_threads():
    tm = metrics.TaskMetrics({"ob_ok", "ob_broken"})
    h = hooks.add(tm)
    try:
        with worker(threads=3) as w:
            for i in range(30):
                ob_ok.send(i)
            ob_broken.send(1)
            w.join()
    finally:
        hooks.remove(h)
    snap = tm.snapshot()
    assert sum(snap[("ob_ok", "success")][:-1]) == 30
    assert sum(snap[("ob_broken", "dead")][:-1]) == 1
    assert set(snap) == {("ob_ok", "success"), ("ob_broken", "dead")}
    tally = Tally({"ob_ok"})
    assert tally.label("ob_ok") == "ob_ok" and tally.label("os.system") == "unknown"
    tally.count(tally.dead, "Q", "evil\nname")
    assert tally.dead == {("Q", "unknown"): 1}


def test_loss_causes_are_a_fixed_set():
    assert loss_cause(ConnectionLost("connection reset by peer")) == "connection_lost"
    assert loss_cause(ConnectionLost("missed heartbeats: nothing from the broker for 4s")) == "heartbeat_missed"
    assert loss_cause(BrokerTimeout("no answer")) == "timeout"
    assert loss_cause(ConnectionClosed(320, "CONNECTION_FORCED")) == "node_shutdown"
    assert loss_cause(ConnectionClosed(541, "INTERNAL_ERROR")) == "closed_by_broker"
    assert loss_cause(ChannelClosed(1, 406, "PRECONDITION_FAILED - delivery acknowledgement timed out")) \
        == "channel_closed"


def test_parse_listen():
    assert metrics.parse_listen("9191") == ("127.0.0.1", 9191)
    assert metrics.parse_listen(":9191") == ("0.0.0.0", 9191)
    assert metrics.parse_listen("10.0.0.5:80") == ("10.0.0.5", 80)
    assert metrics.parse_listen("[::1]:9191") == ("::1", 9191)
    for bad in ("host:", "host:x", "70000"):
        with pytest.raises(ConfigError):
            metrics.parse_listen(bad)


# -- supervisor aggregation, with two fake children serving real endpoints ----------------------------
def _child(acked: int, busy: int) -> tuple[CollectorRegistry, Counter, object, int]:
    reg = CollectorRegistry()
    c = Counter("magne_messages_acked", "acked", ["queue", "task"], registry=reg)
    c.labels("Q", "t").inc(acked)
    Gauge("magne_tasks_running", "running", registry=reg).set(busy)
    server, _thread = start_http_server(0, "127.0.0.1", reg)
    return reg, c, server, server.server_port


def _scrape(sup: metrics.SupervisorMetrics) -> dict[tuple[str, str], float]:
    out = {}
    for fam in text_string_to_metric_families(generate_latest(sup.registry).decode()):
        for s in fam.samples:
            if s.name in ("magne_messages_acked_total", "magne_tasks_running"):
                out[(s.name, s.labels.get("process", ""))] = s.value
    return out


def test_supervisor_sums_children_and_keeps_the_counts_of_a_child_that_went_away(tmp_path):
    sup = metrics.SupervisorMetrics("127.0.0.1:0", str(tmp_path))
    sup.registry.register(metrics._Own(sup))
    reg1, c1, srv1, port1 = _child(10, 2)
    reg2, _c2, srv2, port2 = _child(5, 1)
    servers = [srv1, srv2]
    try:
        sup.child_up(1, 1001, port1)
        sup.child_up(2, 1002, port2)
        got = _scrape(sup)
        assert got[("magne_messages_acked_total", "1")] == 10
        assert got[("magne_messages_acked_total", "2")] == 5
        assert got[("magne_messages_acked_total", "all")] == 15
        assert got[("magne_tasks_running", "all")] == 3

        # Child 1 exits after counting 4 more; it left its final counters in a file (as a warm exit does).
        c1.labels("Q", "t").inc(4)
        (tmp_path / "1001.prom").write_bytes(generate_latest(reg1))
        srv1.shutdown()
        sup.child_down(1001)
        reg3, c3, srv3, port3 = _child(0, 0)
        servers.append(srv3)
        sup.child_up(1, 1003, port3)
        got = _scrape(sup)
        assert got[("magne_messages_acked_total", "1")] == 14  # the final file's 14, not the last scrape's 10
        assert got[("magne_messages_acked_total", "all")] == 19
        assert got[("magne_tasks_running", "1")] == 0  # a dead child's gauges go with it
        assert not (tmp_path / "1001.prom").exists()

        # Child 2 is killed: no final file; its last scraped values stay in the totals.
        srv2.shutdown()
        sup.child_down(1002)
        c3.labels("Q", "t").inc(2)
        got = _scrape(sup)
        assert got[("magne_messages_acked_total", "2")] == 5
        assert got[("magne_messages_acked_total", "1")] == 16
        assert got[("magne_messages_acked_total", "all")] == 21
    finally:
        for s in servers:
            s.server_close()


# -- magne status, from its parts ---------------------------------------------------------------
def test_status_reads_workers_from_a_supervisor_endpoint_and_renders():
    reg = CollectorRegistry()
    info = Gauge("magne_worker_info", "", ["node", "pid", "queues", "version", "process"], registry=reg)
    info.labels("amqp://guest@h:5672/%2F", "11", "Q", "0", "1").set(1)
    info.labels("amqp://guest@h:5672/%2F", "12", "Q", "0", "2").set(1)
    running = Gauge("magne_tasks_running", "", ["process"], registry=reg)
    running.labels("1").set(2)
    running.labels("all").set(2)
    ages = Gauge("magne_task_running_seconds", "", ["slot", "task", "process"], registry=reg)
    ages.labels("0", "add", "1").set(1.5)
    ages.labels("3", "fetch", "1").set(12.25)
    server, _t = start_http_server(0, "127.0.0.1", reg)
    try:
        ws = status.workers_from(f"127.0.0.1:{server.server_port}")
    finally:
        server.shutdown()
        server.server_close()
    assert [(w.process, w.pid, w.busy) for w in ws] == [("1", "11", 2), ("2", "12", 0)]
    assert ws[0].running == [{"slot": 3, "task": "fetch", "seconds": 12.25}, {"slot": 0, "task": "add", "seconds": 1.5}]
    report = status.Report("now", "amqp", "passive declares over AMQP", [
        status.QueueStatus("Q", ready=7, consumers=2, rates={"ready_change": -3.0}, dead={"exists": True, "ready": 1}),
        status.QueueStatus("GONE", exists=False)], ws)
    text = status.render(report)
    assert "Q" in text and "-3.0" in text and "(no such queue)" in text
    assert "fetch 12.2s, add 1.5s" in text and "process 2" in text
    dead = status.workers_from("127.0.0.1:1")
    assert not dead[0].ok and dead[0].error


def test_status_needs_queues(capsys):
    import logging

    from magne.cli import main

    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    try:
        assert main(["status"]) == 2
    finally:  # main() set up logging on capsys's stderr, which closes with this test: later records would fail
        root.handlers[:], root.level = handlers, level
    assert "name a task module or --queues" in capsys.readouterr().err


def test_hook_registry():
    h = hooks.Hook()
    assert hooks.add(h) is h and hooks.add(h) is h
    assert hooks.registered().count(h) == 1
    hooks.remove(h)
    assert h not in hooks.registered()
    with pytest.raises(TypeError):
        hooks.add(object())  # type: ignore[arg-type]
    assert not hooks.HookSet([h])  # nothing overridden: the pool keeps its plain path
    assert hooks.HookSet([Recorder()])


def test_worker_hooks_run_on_start_and_stop_in_order():
    seen = []

    class Life(hooks.Hook):
        def on_worker_start(self, info):
            seen.append(("start", info.pid == os.getpid()))

        def on_worker_stop(self, info):
            seen.append(("stop", info.threads))

    hs = hooks.HookSet([Life()])
    info = hooks.WorkerInfo(os.getpid(), "amqp://x", ["Q"], 4, ["t"])
    hs.worker_start(info)
    hs.worker_stop(info)
    assert seen == [("start", True), ("stop", 4)]
    assert not hs  # no task hooks: the pool's plain path
