"""`magne status` against the real broker, without and with the management plugin."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from typing import Any

import pytest

from support import ROOT, URL, task_body, wait_for
from support.scrape import metrics_url

MANAGEMENT = "rabbitmq_management"


def plugin_enabled() -> bool:
    out = subprocess.run(["rabbitmq-plugins", "list", "--enabled", "--minimal"], capture_output=True, text=True,
                         timeout=60)
    return MANAGEMENT in out.stdout.split()


def status(*args: str, env: dict[str, str] | None = None, cwd: Any = None) -> subprocess.CompletedProcess[str]:
    full = {**os.environ, "MAGNE_URL": URL,
            "PYTHONPATH": f"{ROOT / 'tests' / 'support'}{os.pathsep}{os.environ.get('PYTHONPATH', '')}", **(env or {})}
    return subprocess.run([sys.executable, "-m", "magne", "status", *args], capture_output=True, text=True, env=full,
                          timeout=60, cwd=cwd)


def report(*args: str, **kw: Any) -> dict[str, Any]:
    out = status(*args, "--format", "json", **kw)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


def by_name(rep: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {q["name"]: q for q in rep["queues"]}


@pytest.fixture(scope="module")
def management() -> Iterator[str]:
    """The management plugin on for these tests: enabled here only if it was off, and disabled again after."""
    was_on = plugin_enabled()
    if not was_on:
        subprocess.run(["rabbitmq-plugins", "enable", MANAGEMENT], capture_output=True, check=True, timeout=120)
    base = "http://127.0.0.1:15672"

    def answers() -> bool:
        req = urllib.request.Request(base + "/api/overview", headers={"Authorization": "Basic Z3Vlc3Q6Z3Vlc3Q="})
        try:
            with urllib.request.urlopen(req, timeout=2) as resp:
                return resp.status == 200
        except OSError:
            return False

    try:
        wait_for(answers, 60, interval=0.5, what="the management API")
        yield base
    finally:
        if not was_on:
            subprocess.run(["rabbitmq-plugins", "disable", MANAGEMENT], capture_output=True, timeout=120)


def test_status_over_amqp_when_the_management_api_is_not_there(broker, names):
    q = names["main"]
    ch = broker.ch
    ch.queue_declare(q, durable=True)
    ch.queue_declare(f"{q}.dead", durable=True)
    for i in range(5):
        broker.publish("", q, task_body("record", i))
    for i in range(2):
        broker.publish("", f"{q}.dead", task_body("record", i))
    # Without the plugin (its normal state here); if it is on, point at a port where nothing answers.
    away = ["--management", "http://127.0.0.1:1"] if plugin_enabled() else []
    rep = report("--queues", q, f"{q}-missing", "--sample", "0.2", *away)
    assert rep["source"] == "amqp"
    assert "management API not reachable" in rep["source_detail"] and "ready and consumers only" in rep["source_detail"]
    qs = by_name(rep)
    assert (qs[q]["ready"], qs[q]["consumers"], qs[q]["unacked"]) == (5, 0, None)
    assert qs[q]["dead"] == {"exists": True, "ready": 2}
    assert qs[q]["rates"] == {"ready_change": 0.0}
    assert qs[q]["delayed"] is None  # delay queues cannot be listed over AMQP
    assert qs[f"{q}-missing"]["exists"] is False

    text = status("--queues", q, "--sample", "0", *away)
    assert text.returncode == 0, text.stderr
    assert "source: passive declares over AMQP" in text.stdout and q in text.stdout
    forced = status("--queues", q, "--source", "http", "--management", "http://127.0.0.1:1")
    assert forced.returncode == 2 and "management API not reachable" in forced.stderr


def test_status_watch_refreshes_in_place_until_ctrl_c(broker, names):
    q = names["main"]
    broker.ch.queue_declare(q, durable=True)
    env = {**os.environ, "MAGNE_URL": URL}
    proc = subprocess.Popen([sys.executable, "-m", "magne", "status", "--queues", q, "--source", "amqp", "--sample", "0",
                             "--watch", "0.2"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    try:
        seen = b""
        deadline = time.monotonic() + 30
        while seen.count(b"\x1b[H\x1b[J") < 3 and time.monotonic() < deadline:
            seen += os.read(proc.stdout.fileno(), 4096)
        assert seen.count(b"\x1b[H\x1b[J") >= 3, seen
        proc.send_signal(signal.SIGINT)
        assert proc.wait(20) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


@pytest.mark.reconfigures
def test_status_from_the_management_api_with_the_workers_metrics(broker, names, start_worker, management):
    slow = names["slow"]
    w = start_worker("--threads", "2", "--prefetch", "2", "--metrics", "127.0.0.1:0")
    w.wait_ready()
    metrics = metrics_url(w)
    for i in range(6):
        broker.publish(slow, slow, task_body("slow", f"s{i}", 20))
    env = {k: v for k, v in names.items() if k.startswith("MAGNE_")}

    def settled() -> dict[str, Any] | None:
        rep = report("e2e_tasks", "--metrics", metrics, env=env)
        q = by_name(rep)[slow]
        return rep if (q["ready"], q["unacked"], q["consumers"]) == (4, 2, 1) else None

    rep = wait_for(settled, 45, interval=1, what="the management API's figures (refreshed every 5 s)")
    assert rep["source"] == "http" and management in rep["source_detail"]
    qs = by_name(rep)
    assert set(qs) == {names["main"], slow, names["orig"]}  # every queue of the task module
    s = qs[slow]
    [consumer] = s["consumer_details"]
    assert "magne worker" in consumer["connection"] and f"pid={w.pid}" in consumer["connection"]
    assert consumer["prefetch"] == 2
    assert s["dead"] == {"exists": True, "ready": 0} and s["delayed"] == {"queues": 0, "ready": 0, "due": 0}
    assert set(s["rates"]) == {"publish", "deliver_get", "ack", "redeliver"}
    [worker] = rep["workers"]
    assert (worker["pid"], worker["busy"], worker["live"], worker["lost"]) == (str(w.pid), 2, 2, 0)
    assert [r["task"] for r in worker["running"]] == ["slow", "slow"] and all(r["seconds"] > 0 for r in worker["running"])
    assert worker["node"].startswith("amqp://")

    text = status("e2e_tasks", "--metrics", metrics, env=env, cwd=None)
    assert text.returncode == 0, text.stderr
    assert f"source: management API at {management}" in text.stdout
    assert "consumer magne worker" in text.stdout and "running: slow" in text.stdout
    w.signal(signal.SIGQUIT)  # cold: the slow tasks need not finish
    assert w.wait(30) == 0
