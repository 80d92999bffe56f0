"""The README's main job: `magne demo` must work and tell the truth."""

from __future__ import annotations

import subprocess
import sys

from support import URL


def test_magne_demo_runs_a_batch_and_reports_it():
    out = subprocess.run([sys.executable, "-m", "magne", "demo", "--count", "300", "--url", URL],
                         capture_output=True, text=True, timeout=180)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "delivered=300 acked=292 retried=0 dead-lettered=8" in out.stdout
    assert "magne.demo.dead holds 8 dead letters" in out.stdout
    assert out.stdout.rstrip().endswith("magne demo: OK")
