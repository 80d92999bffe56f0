"""The publish workload's Node.js ceiling peers (benchmarks.md, 5): amqplib on a confirm channel, bench/node/publish.js.

`amqplib-w1000`: a window of 1,000 unconfirmed, the broker's confirmed rate on this machine (the ceiling for
magne's `send_many`). `amqplib-w1`: a window of 1, one round trip plus fsync per message (the floor for one
thread's `send()` in a loop). Same messages as magne's (body, content type, message id, persistent), same
queue and exchange. The package is pinned in bench/node/package.json and package-lock.json; the bench
installs it (`npm ci`) the first time a Node peer runs, as it is part of the bench's own setup, not magne's.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

NODE_DIR = Path(__file__).parent / "node"
WINDOWS = {"amqplib-w1000": 1000, "amqplib-w1": 1}


def is_node_peer(name: str) -> bool:
    return name in WINDOWS


def ensure_installed() -> None:
    """npm ci into bench/node/node_modules unless it is there. The bench's parent process, before a Node run."""
    if (NODE_DIR / "node_modules" / "amqplib" / "package.json").exists():
        return
    npm = shutil.which("npm")
    if npm is None or shutil.which("node") is None:
        raise SystemExit("the amqplib peers need node and npm (Node.js 18 or later) on PATH")
    subprocess.run([npm, "ci", "--no-audit", "--no-fund", "--loglevel", "error"], cwd=NODE_DIR, check=True)


def command(name: str, n: int, queue: str) -> list[str]:
    """The argv of one Node run: prints the same JSON line as bench/publish.py (plus connect_s)."""
    ensure_installed()
    return [shutil.which("node") or "node", str(NODE_DIR / "publish.js"), str(WINDOWS[name]), str(n), queue]
