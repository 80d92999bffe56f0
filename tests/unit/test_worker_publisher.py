"""A worker given --url points the process's default publisher at that broker: its tasks' own sends, results,
chords, cancels, inspect, events, schedules and leases all go to the broker it consumes from, over one publisher
(before: MAGNE_URL's, or localhost's, for some of them, and a second publisher for the others)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_a_worker_given_url_points_the_default_publisher_and_its_machinery_there():
    code = (
        "import os\n"
        "os.environ.pop('MAGNE_URL', None)\n"
        "from magne import coordination, publisher, worker\n"
        "from magne.registry import task\n"
        "t = task(name='wp_x')(lambda: None)\n"
        "url = 'amqp://guest:guest@127.0.0.1:1/%2F'\n"
        "w = worker.Worker(worker.Options(modules=['m'], url=url), {'wp_x': t})\n"
        "pub = publisher.default_publisher()\n"
        "assert [(p.host, p.port) for p in pub.nodes.all] == [('127.0.0.1', 1)], pub.nodes.all\n"
        "assert coordination.publisher_for(w.opts) is pub\n"
        "assert w.control is not None and w.control.publisher is pub and not w.control.own\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert out.returncode == 0, out.stderr
