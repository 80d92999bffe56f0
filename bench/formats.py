"""python -m bench.formats [N] [RUNS]: how fast one magne worker runs each message format (issue 24).

The same no-op task, N messages prefilled in a queue, one `magne worker` process (8 threads, default prefetch),
timed from its `ready` line to an empty queue. Formats, alternating run by run (A B C D A B C D ...):
  magne            magne's own body, no --accept (the baseline)
  magne+accept     magne's body in a queue consumed with --accept dramatiq,celery (the cost of detection)
  dramatiq         dramatiq's body (as its RabbitmqBroker writes it) in a dramatiq queue, --accept dramatiq
  celery           celery's protocol-2 message (headers and [args, kwargs, embed]), --accept celery
Prints the median rate of each and its ratio to magne's, then each format's parsing cost per message
(Runner.resolve, best of 7, in this process: steady on a loaded machine, where the rates are not).
Needs the local RabbitMQ on 127.0.0.1:5672.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
import uuid

import pika

URL = os.environ.get("BENCH_URL", "amqp://guest:guest@127.0.0.1:5672/%2F")
FORMATS = ("magne", "magne+accept", "dramatiq", "celery")


def bodies(fmt: str, queue: str, n: int) -> tuple[list[bytes], pika.BasicProperties]:
    if fmt in ("magne", "magne+accept"):
        out = [json.dumps({"func": "noop", "args": [], "id": uuid.uuid4().hex}).encode() for _ in range(n)]
        return out, pika.BasicProperties(delivery_mode=2, content_type="application/json")
    if fmt == "dramatiq":
        out = [json.dumps({"queue_name": queue, "actor_name": "noop", "args": [], "kwargs": {}, "options": {},
                           "message_id": str(uuid.uuid4()), "message_timestamp": int(time.time() * 1000)},
                          separators=(",", ":")).encode() for _ in range(n)]
        return out, pika.BasicProperties(delivery_mode=2)
    embed = {"callbacks": None, "errbacks": None, "chain": None, "chord": None}
    headers = {"lang": "py", "task": "noop", "id": str(uuid.uuid4()), "shadow": None, "eta": None, "expires": None,
               "group": None, "group_index": None, "retries": 0, "timelimit": [None, None],
               "root_id": str(uuid.uuid4()), "parent_id": None, "argsrepr": "()", "kwargsrepr": "{}",
               "origin": "gen1@bench", "ignore_result": False}
    out = [json.dumps([[], {}, embed]).encode() for _ in range(n)]
    return out, pika.BasicProperties(delivery_mode=2, content_type="application/json", content_encoding="utf-8",
                                     headers=headers, correlation_id=headers["id"])


def declare(ch: pika.adapters.blocking_connection.BlockingChannel, fmt: str, queue: str) -> None:
    if fmt == "dramatiq":
        args = {"x-dead-letter-exchange": "", "x-dead-letter-routing-key": f"{queue}.XQ"}
        ch.queue_declare(queue, durable=True, arguments=args)
    else:
        ch.queue_declare(queue, durable=True)


def one(fmt: str, n: int) -> float:
    queue = f"bench-formats-{fmt.replace('+', '-')}-{uuid.uuid4().hex[:6]}"
    conn = pika.BlockingConnection(pika.URLParameters(URL))
    ch = conn.channel()
    declare(ch, fmt, queue)
    payloads, props = bodies(fmt, queue, n)
    for body in payloads:
        ch.basic_publish("", queue, body, props)
    args = {"magne": [], "magne+accept": ["--accept", "dramatiq,celery", "--dramatiq-queues", queue],
            "dramatiq": ["--accept", "dramatiq"], "celery": ["--accept", "celery"]}[fmt]
    if fmt == "magne+accept":
        ch.queue_delete(queue)
        declare(ch, "dramatiq", queue)
        for body in payloads:
            ch.basic_publish("", queue, body, props)
    env = {**os.environ, "MAGNE_URL": URL, "BENCH_FORMATS_QUEUE": queue}
    proc = subprocess.Popen([sys.executable, "-m", "magne", "--log-format", "json", "worker", "bench.tasks_formats",
                             "--threads", "8", *args], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env)
    try:
        assert proc.stdout is not None
        for line in proc.stdout:
            if b'"event": "ready"' in line or b'"event":"ready"' in line:
                break
        else:
            raise RuntimeError(f"the {fmt} worker stopped before it was ready")
        t0 = time.perf_counter()
        while ch.queue_declare(queue, passive=True).method.message_count:
            time.sleep(0.005)
        elapsed = time.perf_counter() - t0
    finally:
        proc.terminate()
        proc.wait(30)
        for q in (queue, f"{queue}.dead", f"{queue}.DQ", f"{queue}.XQ"):
            ch.queue_delete(q)
        ch.exchange_delete(queue)
        conn.close()
    return n / elapsed


def parse_cost(repeat: int = 7, number: int = 20000) -> dict[str, float]:
    """Microseconds per message of Runner.resolve for each format (best of `repeat`: robust on a loaded machine)."""
    import timeit

    from pamqp import commands

    from magne import formats
    from magne.amqp import codec
    from magne.delivery import Delivery
    from magne.registry import REGISTRY
    from magne.runner import Runner

    os.environ.setdefault("BENCH_FORMATS_QUEUE", "q")
    import bench.tasks_formats  # noqa: F401 - registers noop on queue q

    tasks = {"noop": REGISTRY["noop"]}
    plain, accepting = Runner(tasks, lambda d: None), Runner(tasks, lambda d: None)
    accepting.accept = formats.plan(["dramatiq,celery"], ["q"], ["q"])
    out = {}
    for fmt, runner in (("magne", plain), ("magne+accept", accepting), ("dramatiq", accepting), ("celery", accepting)):
        payloads, props = bodies(fmt, "q", 1)
        p = commands.Basic.Properties(**{k: v for k, v in vars(props).items() if v is not None})
        header = codec.header_payload(p, len(payloads[0]))
        body = payloads[0]
        runner.resolve(Delivery(1, 1, "q", body, header, False))  # fails loudly if the format is not read
        best = min(timeit.repeat(lambda r=runner, b=body, h=header: r.resolve(Delivery(1, 1, "q", b, h, False)),
                                 repeat=repeat, number=number))
        out[fmt] = best / number * 1e6
    return out


def main() -> None:
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 20000
    runs = int(sys.argv[2]) if len(sys.argv) > 2 else 3
    rates: dict[str, list[float]] = {f: [] for f in FORMATS}
    for _ in range(runs):
        for fmt in FORMATS:
            rates[fmt].append(one(fmt, n))
    base = statistics.median(rates["magne"])
    print(f"{n} no-op messages per run, {runs} runs each, one worker process with 8 threads")
    print(f"{'format':14} {'msg/s (median)':>15} {'min-max':>17} {'vs magne':>9}")
    for fmt, r in rates.items():
        med = statistics.median(r)
        print(f"{fmt:14} {med:15,.0f} {min(r):8,.0f}-{max(r):<8,.0f} {med / base:9.2f}")
    print("\nparsing and lookup per message (Runner.resolve, best of 7 x 20,000, in this process):")
    cost = parse_cost()
    for fmt, us in cost.items():
        print(f"{fmt:14} {us:6.2f} us  ({us / cost['magne']:.2f} x magne's)")


if __name__ == "__main__":
    main()
