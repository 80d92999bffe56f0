"""`magne demo`: start a worker, send a demo batch, print what ran, stop the worker.

Its queue starts empty (deleted first) and its dead letters stay afterwards, for `magne dead list magne.demo`.

The module doubles as the demo's task module (the worker imports `magne.demo`).
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import tempfile
import time

from pamqp import commands

from magne import topology, wire
from magne.amqp import names
from magne.amqp.url import parse_url, resolve_url
from magne.engine.client import Client
from magne.publisher import Publisher
from magne.registry import task

QUEUE = "magne.demo"


@task(queue=QUEUE)
def demo_work(n: int) -> int:
    return sum(i * i for i in range(n % 100))


@task(queue=QUEUE)
def demo_fail(n: int) -> None:
    raise RuntimeError(f"demo task {n} fails on purpose")


def _ready(client: Client, queue: str) -> int:
    return client.queue_counts(queue)[0]


def run_demo(count: int, threads: int, url: str | None) -> int:
    url = resolve_url(url)
    params = parse_url(url)
    pub = Publisher(url)
    admin = Client(params, "magne demo").open()
    dead = QUEUE + ".dead"
    for q in (QUEUE, dead, topology.due_queue(QUEUE)):
        admin.rpc(names.QueueDelete(queue=q), commands.Queue.DeleteOk)

    bad = [b"{not json", wire.encode("no_such_task", [1]), wire.encode("demo_work", [1, 2, 3])]
    failing = 5
    good = max(0, count - len(bad) - failing)
    print(f"magne demo: sending {good} good tasks, {failing} that raise and {len(bad)} malformed messages "
          f"to queue {QUEUE} on {params.safe_url()}")
    t0 = time.monotonic()
    for i in range(good):
        mid = wire.new_id()
        pub.publish(QUEUE, wire.encode("demo_work", [i], None, mid), wire.properties_for(mid))
    for i in range(failing):
        mid = wire.new_id()
        pub.publish(QUEUE, wire.encode("demo_fail", [i], None, mid), wire.properties_for(mid))
    for i, body in enumerate(bad):
        pub.publish(QUEUE, body, wire.properties_for(f"bad-{i}"))
    pub.close()
    sent = good + failing + len(bad)
    print(f"  published {sent} messages with publisher confirms in {time.monotonic() - t0:.2f}s")

    with tempfile.TemporaryFile("w+") as logf:
        t1 = time.monotonic()
        # The URL goes to the child in the environment: argv (with its password) is visible to every user in `ps`.
        worker = subprocess.Popen([sys.executable, "-m", "magne", "worker", "magne.demo", "--threads", str(threads)],
                                  stdout=logf, stderr=subprocess.STDOUT, env={**os.environ, "MAGNE_URL": url})
        try:
            deadline = time.monotonic() + 120
            while _ready(admin, QUEUE) > 0 or _ready(admin, dead) < failing + len(bad):
                if worker.poll() is not None or time.monotonic() > deadline:
                    logf.seek(0)
                    print(logf.read())
                    print("magne demo: the worker did not drain the queue", file=sys.stderr)
                    return 1
                time.sleep(0.02)
            drained = time.monotonic() - t1
            worker.send_signal(signal.SIGTERM)
            code = worker.wait(60)
        finally:
            if worker.poll() is None:
                worker.kill()
        logf.seek(0)
        log = logf.read()
    stats = re.search(r"stopped: (.*?);", log)
    print(f"  worker (1 process, {threads} threads) started, drained the queue in {drained:.2f}s "
          f"({sent / drained:.0f} msg/s including start-up), stopped warmly with exit code {code}")
    print(f"  worker's own count: {stats.group(1) if stats else '(no summary line!)'}")
    for line in log.splitlines():
        if "dead-lettering" in line:
            print("  " + line.split("magne.io: ", 1)[-1])
    left, dead_n = _ready(admin, QUEUE), _ready(admin, dead)
    print(f"  queue {QUEUE}: {left} left; {dead} holds {dead_n} dead letters with their reasons")
    # The dead letters stay (the next demo starts afresh): they are the point of the last lines.
    print(f"  look at them:  magne dead list {QUEUE}    (reason, error, attempts and body of each)")
    print(f"  remove them:   magne dead purge {QUEUE}")
    admin.close()
    ok = code == 0 and left == 0 and dead_n == failing + len(bad) and stats is not None and f"acked={good} " in log
    print("magne demo: OK" if ok else "magne demo: FAILED")
    return 0 if ok else 1
