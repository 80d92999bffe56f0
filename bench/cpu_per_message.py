"""CPU per message of one worker process on the raw workload: where a per-message cost went, feature by feature.

python -m bench.cpu_per_message N PREFETCH [--base DIR] [-- WORKER ARGS...]

Fills `bench-magne` with N `noop` messages, runs one worker (8 threads, the given prefetch, the extra worker
arguments, e.g. `--events off --control off`; with `--base DIR`, magne as checked out in DIR, as the magne-base
peer does), and prints its rate and its CPU seconds per message once the queue is empty. The whole-workload
figures are `python -m bench`'s; this one isolates the worker's own CPU, which moves less with the machine's
load than a rate does.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time

import pika
import psutil

from bench import measure, peers


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("n", type=int)
    ap.add_argument("prefetch", type=int)
    ap.add_argument("--base", help="a checkout of magne to run instead of this one (BENCH_MAGNE_BASE)")
    argv = sys.argv[1:]
    cut = argv.index("--") if "--" in argv else len(argv)
    args, extra = ap.parse_args(argv[:cut]), argv[cut + 1:]
    peer = peers.magne()
    measure.reset_queues(peer)
    peer.declare()
    measure.enqueue(peer, "noop", [[] for _ in range(args.n)])
    cmd = peer.command(args.prefetch) + extra
    env = dict(os.environ)
    if args.base:
        cmd = [cmd[0], "-m", "bench.base", *cmd[2:]]
        env["BENCH_MAGNE_BASE"] = args.base
    conn = pika.BlockingConnection(pika.URLParameters(measure.URL))
    ch = conn.channel()
    t0 = time.monotonic()
    proc = subprocess.Popen(cmd, env=env)
    try:
        deadline = t0 + 600
        while True:  # a passive declare is cheap; rabbitmqctl (for the unacked count) only once nothing is ready
            if proc.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"the worker exited ({proc.returncode}) or did not drain the queue in 600 s")
            if ch.queue_declare(peer.queue, passive=True).method.message_count == 0 and time.monotonic() - t0 > 1:
                if measure.queue_state(peer.queue) == (0, 0):
                    break
            time.sleep(0.02)
        elapsed = time.monotonic() - t0
        cpu = psutil.Process(proc.pid).cpu_times()
        used = cpu.user + cpu.system
    finally:
        measure.stop(proc)
        conn.close()
    print(f"{' '.join(extra) or 'default'}{' (base)' if args.base else ''}: {args.n / elapsed:,.0f}/s, "
          f"{used:.2f} CPU-s, {used / args.n * 1e6:.1f} us per message")


if __name__ == "__main__":
    main()
