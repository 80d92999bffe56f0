"""CPU per message of one worker process on the raw workload: where a per-message cost went, feature by feature.

python -m bench.cpu_per_message N PREFETCH [--base DIR] [--task T] [--bare] [--profile FILE] [-- WORKER ARGS...]

Fills `bench-magne` with N `noop` messages (`--task incr`: the throughput workload's), runs one worker (8 threads,
the given prefetch, the extra worker arguments, e.g. `--events off --control off`; with `--base DIR`, magne as
checked out in DIR, as the magne-base peer does), and prints its rate and its CPU seconds per message once the
queue is empty. The whole-workload figures are `python -m bench`'s; this one isolates the worker's own CPU, which
moves less with the machine's load than a rate does. It also prints the rate from the worker's first consumer until
every message was delivered (the per-message path without the start-up), the start-up itself, and the broker's CPU
per message (the two share this 2-core machine); `--bare` runs the bare-loop ceiling the same way, `--profile FILE`
samples which thread holds the GIL (py-spy).
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
    ap.add_argument("--task", default="noop", help="the task every message runs (bench/tasks_magne.py): noop (the raw "
                    "workload), incr (the throughput workload's Redis INCR)")
    ap.add_argument("--bare", action="store_true", help="run the bare-loop ceiling (bench/bare.py) instead")
    ap.add_argument("--profile", metavar="FILE", help="run the worker under py-spy (pip install py-spy): collapsed "
                    "stacks per thread, GIL holders only, to FILE; its CPU figure then includes py-spy's reads")
    argv = sys.argv[1:]
    cut = argv.index("--") if "--" in argv else len(argv)
    args, extra = ap.parse_args(argv[:cut]), argv[cut + 1:]
    if args.bare and (args.base or extra):
        ap.error("--bare runs the bare loop alone: no --base, no worker arguments")
    spy = os.path.join(os.path.dirname(sys.executable), "py-spy")
    if args.profile and not os.access(spy, os.X_OK):
        ap.error(f"--profile needs py-spy beside this Python ({spy}): pip install py-spy")
    if args.base:
        os.environ["BENCH_MAGNE_BASE"] = args.base  # for compile_sources, and the worker's environment below
    peers.compile_sources()
    peer = peers.magne()
    measure.reset_queues(peer)
    peer.declare()
    measure.enqueue(peer, args.task, [[] for _ in range(args.n)])
    cmd = peer.command(args.prefetch) + extra
    env = dict(os.environ)
    if args.base:
        cmd = [cmd[0], "-m", "bench.base", *cmd[2:]]
    if args.bare:
        cmd = peers.bare().command(args.prefetch)
    if args.profile:
        cmd = [spy, "record", "--format", "raw", "--threads",
               "--gil", "--rate", "400", "--output", args.profile, "--", *cmd]
    conn = pika.BlockingConnection(pika.URLParameters(measure.URL))
    ch = conn.channel()
    broker = [p for p in psutil.process_iter(["name"]) if p.info["name"] == "beam.smp"]
    b0 = sum(sum(p.cpu_times()[:2]) for p in broker)
    t0 = time.monotonic()
    proc = subprocess.Popen(cmd, env=env)
    try:
        deadline = t0 + 600
        first = delivered = 0.0  # when the first consumer was seen; when nothing was left ready (all delivered)
        while True:  # a passive declare is cheap; rabbitmqctl (for the unacked count) only once nothing is ready
            if proc.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"the worker exited ({proc.returncode}) or did not drain the queue in 600 s")
            ok = ch.queue_declare(peer.queue, passive=True).method
            if not first and ok.consumer_count:
                first = time.monotonic()
            if ok.message_count == 0 and first:
                delivered = delivered or time.monotonic()
                if measure.queue_state(peer.queue) == (0, 0):
                    break
            time.sleep(0.005)
        elapsed = time.monotonic() - t0
        worker = psutil.Process(proc.pid)
        if args.profile:  # py-spy's child is the worker; stopping it ends py-spy, which then writes its file
            worker = worker.children()[0]
        cpu = worker.cpu_times()
        used = cpu.user + cpu.system
        brokers = sum(sum(p.cpu_times()[:2]) for p in broker) - b0
        if args.profile:
            worker.terminate()
            proc.wait(60)
    finally:
        if args.profile and proc.poll() is None:  # py-spy may exit on SIGTERM without its child: stop the worker first
            for child in psutil.Process(proc.pid).children():
                child.terminate()
        measure.stop(proc)
        conn.close()
    label = "bare-loop" if args.bare else (" ".join(extra) or "default") + (" (base)" if args.base else "")
    print(f"{label}: {args.n / elapsed:,.0f}/s, "
          f"{used:.2f} CPU-s, {used / args.n * 1e6:.1f} us per message; from its first consumer until every message "
          f"was delivered {args.n / max(delivered - first, 1e-3):,.0f}/s (start-up {first - t0:.2f} s; too few "
          f"messages if that rate is absurd); "
          f"the broker (every beam.smp on this machine) "
          f"{brokers / args.n * 1e6:.1f} us per message")


if __name__ == "__main__":
    main()
