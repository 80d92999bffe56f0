"""python -m bench: magne vs dramatiq vs celery (and taskiq, async-latency only) on the local RabbitMQ.

Workloads and peer settings: ../shared/benchmarks.md (publish: bench/publish.py, and the Node.js amqplib ceiling
and floor in bench/node_peers.py, installed with npm on first use; async-latency: its peers
in bench/peers.py, timed from the worker's first consumer, see bench/measure.py; results: magne alone, the same
task with and without results=True, and task.call's round trip in bench/call_latency.py). Peers alternate (A B C A B C),
3 runs each by default; medians with min-max. Writes bench/results/results.json and
bench/results/chart.png, and prints the table the README quotes.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import platform
import random
import statistics
import subprocess
from pathlib import Path
from typing import Any

from bench import peers
from bench.call_latency import run_call
from bench.measure import Result, run_one, run_publish

OUT = Path(__file__).parent / "results"


def workloads(scale: float) -> dict[str, dict[str, Any]]:
    rng = random.Random(20261129)
    n_lat = max(8, int(1000 * scale))
    sleeps = [rng.choices([0.5, 0.3, 0.1], weights=[30, 20, 50])[0] for _ in range(n_lat)]
    fibs = [rng.randint(1, 200) for _ in range(max(8, int(20000 * scale)))]
    base = ["magne-base"] if os.environ.get("BENCH_MAGNE_BASE") else []  # before/after in one run (bench/peers.py)
    return {
        "throughput": {"task": "incr", "args": [[] for _ in range(max(8, int(20000 * scale)))],
                       "prefetch": [None, 256], "peers": ["magne", *base, "dramatiq", "celery", "magne-p2"]},
        "latency": {"task": "sleep_incr", "args": [[s] for s in sleeps], "minimum": sum(sleeps) / 8,
                    "prefetch": [None], "peers": ["magne", *base, "magne-events-off", "dramatiq", "celery"]},
        # The same sleeps awaited in an `async def` task, 1,000 in flight in one worker process: the minimum
        # is the longest sleep, timed from the worker's first consumer (the messages are all in the queue
        # by then), polled every 5 ms since it is half a second. Prefetch 1,000 for every peer. A run takes a
        # few seconds: one that is not done in a minute is stuck, and is reported so rather than waited on.
        "async-latency": {"task": "async_sleep_incr", "args": [[s] for s in sleeps], "minimum": max(sleeps),
                          "from_consumer": True, "poll": 0.005, "timeout": 60, "prefetch": [peers.ASYNC_IN_FLIGHT],
                          "peers": ["magne-async", "dramatiq-async", "taskiq"]},
        "cpu": {"task": "fib_incr", "args": [[f] for f in fibs],
                "prefetch": [None], "peers": ["magne", "dramatiq", "celery", "magne-p2"]},
        "raw": {"task": "noop", "args": [[] for _ in range(max(8, int(50000 * scale)))], "counter": False,
                "prefetch": [None, 256], "peers": ["magne", *base, "magne-events-off", "magne-metrics", "dramatiq", "celery",
                                                   "bare-loop"]},
        # The cost of results=True (the same task, every message asking for its result: docs/results.md), and
        # task.call's round trip one call at a time against its body's own time (bench/call_latency.py).
        "results": {"task": "incr", "args": [[] for _ in range(max(8, int(20000 * scale)))], "prefetch": [None, 256],
                    "peers": ["results-off", "results-on", "call-0ms", "call-10ms"], "calls": max(8, int(500 * scale))},
        # Enqueueing only (bench/publish.py): each peer's own API, the same 20,000 throughput messages.
        "publish": {"task": "incr", "args": [[] for _ in range(max(8, int(20000 * scale)))], "prefetch": [None],
                    "peers": ["dramatiq", "celery", "dramatiq-confirm", "magne", "magne-8t", "magne-many",
                              "bare-publish", "bare-w8", "amqplib-w1000", "amqplib-w1",
                              *[f"{b}{t}" for b in base for t in ("", "-8t", "-many")]]},
    }


def redis_ceiling(n: int, run: int) -> Result:
    """bench/redis_ceiling.py in a subprocess: the throughput body alone, 8 threads, no broker."""
    key = f"bench:counter:ceiling:{run}"
    env = peers.clean_env()
    env["BENCH_COUNTER"] = key
    out = subprocess.run([peers.PY, "-m", "bench.redis_ceiling", str(n)], env=env, capture_output=True, text=True,
                         check=True)
    data = json.loads(out.stdout)
    from bench.measure import r

    counter = int(r.get(key) or 0)
    r.delete(key)
    res = Result("throughput", "redis-only", "n/a", run, data["n"], elapsed=data["elapsed"],
                 rate=data["n"] / data["elapsed"], cpu_s=data["cpu_s"], connections=0, channels=0,
                 counter=counter, left_ready=0, left_unacked=0, ok=counter == data["n"] + 1)
    return res


RATIO_WORKLOADS = ("latency", "async-latency")  # reported as wall time / the theoretical minimum
REFERENCE = {"async-latency": "dramatiq-async", "results": "results-off"}  # the peer the ratios are against (else dramatiq)
CALLS = ("call-0ms", "call-10ms")  # the results workload's round trips: latency, not a rate


def summarize(results: list[Result]) -> list[dict[str, Any]]:
    groups: dict[tuple[str, str, str], list[Result]] = {}
    for res in results:
        groups.setdefault((res.workload, res.prefetch, res.peer), []).append(res)
    rows = []
    for (wl, pf, peer), rs in groups.items():
        metric = ([x.ratio_to_min for x in rs] if wl in RATIO_WORKLOADS else [x.p50_ms for x in rs] if peer in CALLS
                  else [x.rate for x in rs])
        rows.append({
            "workload": wl, "prefetch": pf, "peer": peer, "runs": len(rs),
            "median": statistics.median(metric), "min": min(metric), "max": max(metric),
            "cpu_s": statistics.median(x.cpu_s for x in rs),
            "cpu_per_1k": statistics.median(1000 * x.cpu_s / x.n for x in rs),
            "rss_mb": statistics.median(x.peak_rss_mb for x in rs),
            "connections": max(x.connections for x in rs), "channels": max(x.channels for x in rs),
            "all_ok": all(x.ok for x in rs),
            "consumer_after": statistics.median(x.consumer_after for x in rs),
            "startup_cpu_s": statistics.median(x.startup_cpu_s for x in rs),
            "p99_ms": statistics.median(x.p99_ms for x in rs), "body_ms": rs[0].body_ms,
        })
    return rows


def table(rows: list[dict[str, Any]]) -> str:
    lines = ["| workload | prefetch | peer | result (median, min-max) | result / reference (dramatiq; -async; results: -off) "
             "| CPU s per 1k tasks | CPU / dramatiq's | peak RSS MB | conns / chans | no loss, no dup |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    by = {(r["workload"], r["prefetch"], r["peer"]): r for r in rows}
    for r in rows:
        ref = REFERENCE.get(r["workload"], "dramatiq")
        d = by.get((r["workload"], r["prefetch"], ref)) or by.get((r["workload"], "default", ref))
        if r["workload"] == "async-latency":  # timed from the first consumer: its start-up, said apart
            res = (f"{r['median']:.3f}x the minimum ({r['min']:.3f}-{r['max']:.3f}); start-up "
                   f"{r.get('consumer_after', 0):.2f} s, {r.get('startup_cpu_s', 0):.2f} CPU-s")
        elif r["peer"] in CALLS:
            res = (f"task.call median {r['median']:.2f} ms ({r['min']:.2f}-{r['max']:.2f}), p99 {r['p99_ms']:.2f} ms; "
                   f"minus the body's {r['body_ms']:g} ms: {r['median'] - r['body_ms']:.2f} ms")
            d = None
        elif r["workload"] in RATIO_WORKLOADS:
            res = f"{r['median']:.3f}x the minimum ({r['min']:.3f}-{r['max']:.3f})"
        else:
            res = f"{r['median']:,.0f}/s ({r['min']:,.0f}-{r['max']:,.0f})"
        vs = f"{r['median'] / d['median']:.3f}x" if d else ""
        cpu_vs = f"{r['cpu_per_1k'] / d['cpu_per_1k']:.2f}x" if d else ""
        no_conns = r["connections"] == 0 and r["peer"] == "redis-only" or r["workload"] == "publish"  # not measured
        conns = "-" if no_conns else f"{r['connections']} / {r['channels']}"
        lines.append(f"| {r['workload']} | {r['prefetch']} | {r['peer']} | {res} | {vs} | {r['cpu_per_1k']:.3f} "
                     f"| {cpu_vs} | {r['rss_mb']:.0f} | {conns} | {'yes' if r['all_ok'] else 'NO'} |")
    return "\n".join(lines)


def publish_targets(rows: list[dict[str, Any]]) -> str:
    """The publish workload against issue 13's targets, from the medians of this run."""
    med = {r["peer"]: r["median"] for r in rows if r["workload"] == "publish"}
    checks = [("magne send_many >= 90 % of Node.js amqplib, confirm channel, window 1,000 (issue 19)", "magne-many",
               "amqplib-w1000", 0.9),
              ("magne send() loop, 1 thread, >= 90 % of amqplib with a window of 1 (issue 19)", "magne", "amqplib-w1", 0.9),
              ("magne send_many >= 2 x dramatiq's send (unconfirmed)", "magne-many", "dramatiq", 2.0),
              ("magne send() from 8 threads >= dramatiq's send, 1 thread (unconfirmed)", "magne-8t", "dramatiq", 1.0),
              ("magne send_many >= 80 % of the bare pipelined-confirms loop", "magne-many", "bare-publish", 0.8),
              ("magne send() from 8 threads vs the bare loop with 8 in flight (its ceiling)", "magne-8t", "bare-w8", 0.8)]
    lines = ["| publish target | ratio (medians) | met |", "|---|---|---|"]
    for text, a, b, want in checks:
        if a in med and b in med and med[b]:
            ratio = med[a] / med[b]
            lines.append(f"| {text} | {ratio:.2f}x (want {want:g}x) | {'yes' if ratio >= want else 'NO'} |")
    return "\n".join(lines) if len(lines) > 2 else ""


def report(rows: list[dict[str, Any]]) -> str:
    """summary.md: the table, and the publish targets when that workload ran."""
    targets = publish_targets(rows)
    return table(rows) + ("\n\n" + targets if targets else "")


def chart(rows: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = sorted({(r["workload"], r["prefetch"]) for r in rows if r["prefetch"] != "n/a" or r["workload"] == "publish"},
                    key=lambda x: (x[0], x[1]))
    fig, axes = plt.subplots(1, len(panels), figsize=(max(7.0, 3.2 * len(panels)), 4), squeeze=False)
    colors = {"magne": "#2a7", "magne-p2": "#7c5", "dramatiq": "#c63", "celery": "#46a", "bare-loop": "#999",
              "redis-only": "#bbb", "magne-8t": "#5b9", "magne-many": "#183", "dramatiq-confirm": "#e96",
              "bare-publish": "#999", "bare-w8": "#bbb", "magne-async": "#2a7", "dramatiq-async": "#c63",
              "taskiq": "#a5c", "amqplib-w1000": "#777", "amqplib-w1": "#aaa"}
    for ax, (wl, pf) in zip(axes[0], panels, strict=True):
        rs = [r for r in rows if r["workload"] == wl and r["prefetch"] in (pf, "n/a") and r["peer"] not in CALLS]
        names = [r["peer"] for r in rs]
        med = [r["median"] for r in rs]
        err = [[r["median"] - r["min"] for r in rs], [r["max"] - r["median"] for r in rs]]
        ax.bar(names, med, yerr=err, capsize=4, color=[colors.get(n, "#888") for n in names])
        if wl == "latency":  # the differences are in the second decimal
            ax.set_ylim(0.98, max(r["max"] for r in rs) * 1.01)
        elif wl in RATIO_WORKLOADS:
            ax.set_ylim(0.9, max(r["max"] for r in rs) * 1.05)
        ax.set_title(f"{wl} (prefetch {pf})" if wl != "publish" else "publish (magne: confirmed)", fontsize=9)
        ax.set_ylabel("wall / theoretical min (lower is better)" if wl in RATIO_WORKLOADS else
                      "messages enqueued/s (higher is better)" if wl == "publish" else "tasks/s (higher is better)",
                      fontsize=8)
        ax.tick_params(axis="x", labelrotation=30, labelsize=8)
    fig.suptitle(f"magne vs dramatiq vs celery (vs taskiq: async) on the local RabbitMQ, {datetime.date.today()}, "
                 f"{subprocess.run(['nproc'], capture_output=True, text=True).stdout.strip()} cores;\n"
                 "medians of 3 runs, whiskers min-max", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    ap = argparse.ArgumentParser(prog="python -m bench")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--workloads", nargs="+", choices=list(workloads(0.0)),
                    default=["throughput", "latency", "cpu", "raw", "publish", "async-latency"])
    ap.add_argument("--peers", nargs="+", default=None, help="limit to these peers")
    ap.add_argument("--scale", type=float, default=1.0, help="scale every N (0.1 for a quick check)")
    ap.add_argument("--out", type=Path, default=OUT)
    ap.add_argument("--replot", action="store_true", help="only rebuild summary.md and chart.png from results.json")
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    if args.replot:
        runs = json.loads((args.out / "results.json").read_text())["runs"]
        rows = summarize([Result(**x) for x in runs])
        (args.out / "summary.md").write_text(report(rows) + "\n")
        chart(rows, args.out / "chart.png")
        print(report(rows))
        return
    peers.compile_sources()
    wls = workloads(args.scale)
    results: list[Result] = []
    for wl in args.workloads:
        spec = wls[wl]
        for prefetch in spec["prefetch"]:
            names = [p for p in spec["peers"] if not args.peers or p in args.peers]
            if prefetch is None:
                names = [p for p in names if p != "bare-loop"]  # the reference always runs at 256
            for run in range(1, args.runs + 1):
                if wl == "throughput" and prefetch is None and (not args.peers or "redis-only" in args.peers):
                    res = redis_ceiling(len(spec["args"]), run)
                    results.append(res)
                    print(f"{wl:10} redis-only (8 threads, no broker) run {run}: {res.rate:8,.0f}/s", flush=True)
                for name in names:  # alternating: A B C A B C ...
                    if name in CALLS:
                        if prefetch is not None:
                            continue  # one worker, one call at a time: the prefetch does not matter
                        res = run_call(name, spec["calls"], run)
                    elif wl == "publish":
                        res = run_publish(name, len(spec["args"]), run)
                    else:
                        res = run_one(peers.ALL[name](), wl, spec["task"], spec["args"], prefetch, run,
                                      use_counter=spec.get("counter", True), minimum=spec.get("minimum"),
                                      from_consumer=spec.get("from_consumer", False), poll=spec.get("poll", 0.05),
                                      timeout=spec.get("timeout", 900))
                    results.append(res)
                    extra = f" {res.ratio_to_min:.3f}x min" if wl in RATIO_WORKLOADS else ""
                    if name in CALLS:
                        extra += f" task.call median {res.p50_ms:.2f} ms p99 {res.p99_ms:.2f} ms"
                    if res.setup_s:
                        extra += f" (its connection took {res.setup_s * 1000:.0f} ms more, untimed)"
                    if spec.get("from_consumer"):
                        extra += (f" ({res.elapsed:.3f}s from the first consumer, which came {res.consumer_after:.2f}s"
                                  f" and {res.startup_cpu_s:.2f} CPU-s after the launch)")
                    print(f"{wl:10} {name:9} prefetch={res.prefetch:7} run {run}: {res.rate:8,.0f}/s{extra} "
                          f"cpu {res.cpu_s:5.1f}s rss {res.peak_rss_mb:4.0f}MB conns {res.connections} "
                          f"chans {res.channels} {'ok' if res.ok else 'NOT OK ' + res.note}", flush=True)
                    (args.out / "results.json").write_text(json.dumps(
                        {"date": datetime.datetime.now().isoformat(timespec="seconds"),
                         "machine": f"{platform.node()} {platform.machine()} Python {platform.python_version()}",
                         "runs": [dataclasses.asdict(x) for x in results]}, indent=1))
    rows = summarize(results)
    (args.out / "summary.md").write_text(report(rows) + "\n")
    chart(rows, args.out / "chart.png")
    print()
    print(report(rows))


if __name__ == "__main__":
    main()
