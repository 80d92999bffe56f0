"""The README's main job: `magne demo` must work and tell the truth."""

from __future__ import annotations

import subprocess
import sys

import pytest

from support import URL


@pytest.fixture(autouse=True)
def _demo_queues(broker):
    """The demo leaves its queue and dead letters for the user to look at: a test removes them."""
    broker.track("magne.demo")


def test_magne_demo_runs_a_batch_and_reports_it():
    out = subprocess.run([sys.executable, "-m", "magne", "demo", "--count", "300", "--url", URL],
                         capture_output=True, text=True, timeout=180)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "delivered=300 acked=292 retried=0 dead-lettered=8" in out.stdout
    assert "magne.demo.dead holds 8 dead letters" in out.stdout
    assert out.stdout.rstrip().endswith("magne demo: OK")


def test_magne_demo_keeps_the_dead_letters_it_points_at_and_says_how_to_look_and_purge():
    env_url = ["--url", URL]
    out = subprocess.run([sys.executable, "-m", "magne", "demo", "--count", "100", *env_url],
                         capture_output=True, text=True, timeout=180)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "magne dead list magne.demo" in out.stdout and "magne dead purge magne.demo" in out.stdout
    listed = subprocess.run([sys.executable, "-m", "magne", "dead", "list", "magne.demo", *env_url],
                            capture_output=True, text=True, timeout=60)
    assert listed.returncode == 0, listed.stderr
    assert "magne.demo.dead: 8 dead letters" in listed.stdout  # today: the demo deleted them on its way out
