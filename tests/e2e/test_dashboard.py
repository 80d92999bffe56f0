"""`magne dashboard` in a real browser (Debian's chromium driven by Playwright, never `playwright install`): a worker
runs a task that fails, another queue holds messages nobody consumes, and the page shows what a person looks for:
the queues and their depth, the worker, the failure with its reason. A screenshot is kept as a test artifact."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest

from magne.outgoing import Target
from support import ROOT, URL, wait_for
from support.control_env import isolate

CHROMIUM = "/usr/bin/chromium"
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
        "--disable-sync"]
ARTIFACTS = Path(os.environ.get("MAGNE_TEST_ARTIFACTS") or ROOT / ".artifacts")

pytestmark = pytest.mark.skipif(not os.path.exists(CHROMIUM), reason="needs Debian's chromium (apt-get install chromium)")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def get_json(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=5) as r:
        return json.loads(r.read())


def test_the_dashboard_shows_queues_workers_and_a_recent_failure_in_a_browser(names, broker, monkeypatch, pub,
                                                                               start_worker, tmp_path):
    from playwright.sync_api import sync_playwright

    fleet = isolate(names, broker, monkeypatch)
    w = start_worker("--queues", fleet["main"], modules=("control_tasks",))
    w.wait_ready()
    pub.send(Target("boom", fleet["main"]), [1])
    pub.send(Target("note", fleet["main"]), [2])
    for i in range(3):  # nobody consumes this queue: its depth is 3
        pub.send(Target("a_nap", fleet["async"]), [i, 0])
    port = free_port()
    env = {**os.environ, "MAGNE_URL": URL, **{k: v for k, v in fleet.items() if k.startswith("MAGNE_")}}
    log = open(tmp_path / "dashboard.log", "w")
    dash = subprocess.Popen([sys.executable, "-m", "magne", "dashboard", "--queues", fleet["main"], fleet["async"],
                             "--listen", f"127.0.0.1:{port}"], env=env, stdout=log, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}/"
    try:
        def ready() -> bool:
            assert dash.poll() is None, (tmp_path / "dashboard.log").read_text()
            try:
                s = get_json(base + "api/state")
            except OSError:
                return False
            return bool(s["workers"] and s["history"]["failures"] and s["queues"])
        wait_for(ready, 20, interval=0.2, what="the dashboard's state")
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            page.goto(base)
            queues = page.locator("#queues")
            async_row = queues.locator("tr", has_text=fleet["async"])
            assert async_row.locator("td.ready").inner_text() == "3"
            assert queues.locator("tr", has_text=fleet["main"]).count() == 1
            assert str(w.pid) in page.locator("#workers").inner_text()
            failures = page.locator("#failures").inner_text()
            assert "boom" in failures and "ValueError: boom 1" in failures and "dead-lettered" in failures
            boom = page.locator("#tasks tr", has_text="boom")
            assert boom.locator("td.fail").inner_text() == "1"  # counted once, however often the page refreshed
            assert page.locator("#tasks tr", has_text="note").locator("td.n").first.inner_text() == "1"
            page.wait_for_timeout(2500)  # one refresh by the page's own script: the live part is swapped in
            assert str(w.pid) in page.locator("#workers").inner_text()
            shot = tmp_path / "dashboard.png"
            page.screenshot(path=str(shot), full_page=True)
            browser.close()
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        shutil.copy(shot, ARTIFACTS / "dashboard.png")
    finally:
        dash.terminate()
        try:
            dash.wait(10)
        except subprocess.TimeoutExpired:
            dash.kill()
        log.close()
