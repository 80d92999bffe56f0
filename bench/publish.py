"""The publish workload's enqueueing side, one peer per process: python -m bench.publish PEER N.

Each peer enqueues the same N throughput messages (task `incr`, no arguments) with its own API,
as it ships, into the queue its worker would consume; the parent (bench/__main__.py) prepares
the queue before and checks it holds exactly N after. Prints one JSON line: the seconds the
enqueueing took (from the first call to the last one returning; for magne, every message is
confirmed by then), the process's CPU seconds in that time, and its peak RSS.

Peers:
- dramatiq: `incr.send()` in a loop (pika, no publisher confirms: dramatiq's default).
- dramatiq-confirm: the same with `RabbitmqBroker(confirm_delivery=True)`, for an equal comparison.
- celery: `incr.delay()` in a loop (kombu, no confirms: celery's default).
- magne: `incr.send()` in a loop, one thread, each call waiting for its own confirm.
- magne-8t: `incr.send()` from 8 threads at once (N/8 each), sharing the process's publisher.
- magne-many: `incr.send_many()` of the N, pipelined, every confirm waited for.
- bare-publish: the ceiling, a bare pipelined-confirms loop (bare_publish below): one thread,
  magne's messages encoded by hand inside the timed loop, a window of 1,000 unconfirmed.
- bare-w8: the same loop with a window of 8: what any 8 senders that each wait for their own
  confirm could reach at best (persistent messages are confirmed after the broker's disk write).
The Node.js ceiling and floor (amqplib-w1000, amqplib-w1) are not run here but by node itself:
bench/node_peers.py and bench/node/publish.js, which print the same JSON line.
"""

from __future__ import annotations

import json
import os
import resource
import select
import sys
import threading
import time
from typing import Any

URL = "amqp://guest:guest@127.0.0.1:5672/%2F"


def cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def bare_publish(n: int, window: int, queue: str = "bench-magne") -> None:
    """Publish n magne messages with confirms, `window` unconfirmed at most, nothing else: no threads, no
    futures, no declarations; each message's id, body and frames made in the loop, acks read as they come."""
    from pamqp import commands

    from bench.blocking import open_blocking
    from magne import wire
    from magne.amqp.codec import encode_content, publish_method
    from magne.amqp.url import parse_url
    from magne.outgoing import json_header

    conn = open_blocking(parse_url(URL), "bench bare publish", confirms=True)
    upto, single = [0], set()  # confirmed: every tag up to upto[0] (multiple acks), and single acks above it

    def on_frame(_ch: int, f: Any) -> None:
        if isinstance(f, commands.Basic.Ack):
            if f.multiple:
                upto[0] = max(upto[0], f.delivery_tag)
                single.difference_update([t for t in single if t <= upto[0]])
            elif f.delivery_tag > upto[0]:
                single.add(f.delivery_tag)
        elif isinstance(f, commands.Basic.Nack):
            raise SystemExit("nacked")

    conn.on_frame = on_frame
    method = publish_method(queue, queue)
    fmax = conn.frame_max
    sent = 0
    while upto[0] + len(single) < n:
        while sent < n and sent - upto[0] - len(single) < window:
            mid = wire.new_id()
            body = wire.encode("incr", (), None, mid)
            conn.outbox.write(encode_content(method, json_header(mid, len(body)), body, fmax))
            sent += 1
        conn.flush(time.monotonic())
        fd = conn.fileno()
        r, w, _ = select.select([fd], [fd] if conn.outbox else [], [], 1.0)
        if w:
            conn.on_writable(time.monotonic())
        if r:
            conn.on_readable(time.monotonic())
    conn.abort()


def run(peer: str, n: int) -> dict[str, float]:
    close: Any = None
    if peer.startswith("dramatiq"):
        from bench import tasks_dramatiq  # BENCH_DRAMATIQ_CONFIRM=1 (set by the parent) for dramatiq-confirm

        actor = tasks_dramatiq.incr
        actor.broker.declare_queue(tasks_dramatiq.Q)
        close = actor.broker.close

        def go() -> None:
            for _ in range(n):
                actor.send()
    elif peer == "celery":
        from bench import tasks_celery

        close = tasks_celery.app.close

        def go() -> None:
            for _ in range(n):
                tasks_celery.incr.delay()
    elif peer.startswith("magne"):
        import magne
        from bench import tasks_magne

        magne.configure(URL)
        incr = tasks_magne.incr
        close = magne.publisher.default_publisher().close

        if peer == "magne":
            def go() -> None:
                for _ in range(n):
                    incr.send()
        elif peer == "magne-8t":
            def go() -> None:
                def part(k: int) -> None:
                    for _ in range(k):
                        incr.send()

                threads = [threading.Thread(target=part, args=(n // 8 + (i < n % 8),)) for i in range(8)]
                for t in threads:
                    t.start()
                for t in threads:
                    t.join()
        elif peer == "magne-many":
            def go() -> None:
                incr.send_many(() for _ in range(n)).raise_on_failure()
        else:
            raise SystemExit(f"unknown peer {peer}")
    elif peer in ("bare-publish", "bare-w8"):
        def go() -> None:
            bare_publish(n, 1000 if peer == "bare-publish" else 8)
    else:
        raise SystemExit(f"unknown peer {peer}")
    c0, t0 = cpu(), time.perf_counter()
    go()
    elapsed, cpu_s = time.perf_counter() - t0, cpu() - c0
    if close is not None:
        close()  # unconfirmed peers: everything written is flushed to the broker before the parent counts
    return {"elapsed": elapsed, "cpu_s": cpu_s, "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


if __name__ == "__main__":
    out = run(sys.argv[1], int(sys.argv[2]))
    sys.stdout.write(json.dumps(out) + "\n")
    sys.stdout.flush()
    os._exit(0)  # no teardown in the figures, and no peer's atexit hooks (celery's pool) holding the exit
