"""One benchmark run: enqueue, launch the worker, time it to N, record what it cost, verify."""

from __future__ import annotations

import dataclasses
import os
import signal
import subprocess
import threading
import time
from typing import Any

import pika
import psutil
import redis
from tqdm import tqdm

from bench.peers import Peer, clean_env

URL = "amqp://guest:guest@127.0.0.1:5672/%2F"
r = redis.Redis(host="127.0.0.1", port=6379)


@dataclasses.dataclass
class Result:
    workload: str
    peer: str
    prefetch: str
    run: int
    n: int
    elapsed: float = 0.0
    rate: float = 0.0
    cpu_s: float = 0.0
    peak_rss_mb: float = 0.0
    connections: int = -1
    channels: int = -1
    counter: int = -1
    left_ready: int = -1
    left_unacked: int = -1
    ok: bool = False
    theoretical_min: float = 0.0
    ratio_to_min: float = 0.0
    note: str = ""
    # Workloads timed from the worker's first consumer (async-latency): when that consumer appeared,
    # counted from the worker's launch, and the CPU seconds the worker had used by then. elapsed and
    # cpu_s are then from that moment to the counter's reaching N.
    consumer_after: float = 0.0
    startup_cpu_s: float = 0.0
    # publish, the Node peers: the seconds their connection took to open, outside the timed span.
    setup_s: float = 0.0
    # results, the task.call peers (bench/call_latency.py): round-trip latency, and the body's own time.
    p50_ms: float = 0.0
    p99_ms: float = 0.0
    body_ms: float = 0.0


def rabbitmqctl(*args: str) -> str:
    return subprocess.run(["rabbitmqctl", "-q", *args], capture_output=True, text=True, timeout=60).stdout


def stop(proc: subprocess.Popen) -> None:
    """A worker's warm stop (SIGTERM), and a kill if it takes over a minute."""
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(60)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def queue_state(name: str) -> tuple[int, int]:
    for line in rabbitmqctl("list_queues", "name", "messages_ready", "messages_unacknowledged").splitlines():
        parts = line.split("\t")
        if len(parts) == 3 and parts[0] == name:
            return int(parts[1]), int(parts[2])
    return -1, -1


class Sampler(threading.Thread):
    """CPU seconds and peak RSS of the worker's whole process tree, every 50 ms."""

    def __init__(self, pid: int) -> None:
        super().__init__(daemon=True)
        self.root = psutil.Process(pid)
        self.cpu: dict[int, float] = {}
        self.peak_rss = 0
        self.stop = threading.Event()

    def procs(self) -> list[psutil.Process]:
        try:
            return [self.root, *self.root.children(recursive=True)]
        except psutil.NoSuchProcess:
            return []

    def sample(self) -> None:
        rss = 0
        for p in self.procs():
            try:
                t = p.cpu_times()
                self.cpu[p.pid] = t.user + t.system
                rss += p.memory_info().rss
            except psutil.NoSuchProcess:
                pass
        self.peak_rss = max(self.peak_rss, rss)

    def run(self) -> None:
        while not self.stop.wait(0.05):
            self.sample()

    def amqp_ports(self) -> set[int]:
        ports = set()
        for p in self.procs():
            try:
                for c in p.net_connections(kind="tcp"):
                    if c.raddr and c.raddr.port == 5672:
                        ports.add(c.laddr.port)
            except psutil.NoSuchProcess:
                pass
        return ports


def count_amqp(ports: set[int]) -> tuple[int, int]:
    conns = chans = 0
    for line in rabbitmqctl("list_connections", "peer_port", "channels").splitlines():
        parts = line.split("\t")
        if len(parts) == 2 and parts[0].isdigit() and int(parts[0]) in ports:
            conns += 1
            chans += int(parts[1])
    return conns, chans


def reset_queues(peer: Peer) -> None:
    """Delete the peer's queues (what an earlier run left) and declare them afresh, as the peer does."""
    conn = pika.BlockingConnection(pika.URLParameters(URL))
    ch = conn.channel()
    for q in (peer.queue, *peer.extra_queues):
        ch.queue_delete(q)
    conn.close()
    peer.declare()


def enqueue(peer: Peer, task: str, arglists: list[list[Any]]) -> None:
    reset_queues(peer)
    conn = pika.BlockingConnection(pika.URLParameters(URL))
    ch = conn.channel()
    for body, props in peer.messages(task, arglists):
        ch.basic_publish("", peer.queue, body, props)
    n = len(arglists)
    deadline = time.monotonic() + 120
    while ch.queue_declare(peer.queue, passive=True).method.message_count < n:
        if time.monotonic() > deadline:
            raise RuntimeError(f"{peer.queue} did not reach {n} messages")
        time.sleep(0.05)
    conn.close()


def run_one(peer: Peer, workload: str, task: str, arglists: list[list[Any]], prefetch: int | None, run: int,
            use_counter: bool = True, minimum: float | None = None, from_consumer: bool = False,
            poll: float = 0.05, timeout: float = 900) -> Result:
    """One run: time from the worker's launch (or, with from_consumer, from the moment its first consumer
    is on the queue, so that a workload shorter than a worker's start-up measures the work and not the
    imports) until the counter reaches N, polled every `poll` seconds, for at most `timeout` seconds.
    minimum: the workload's theoretical minimum time, for ratio_to_min."""
    n = len(arglists)
    res = Result(workload, peer.name, str(prefetch or "default"), run, n)
    key = f"bench:counter:{workload}:{peer.name}:{run}"
    r.delete(key)
    enqueue(peer, task, arglists)
    env = clean_env()
    env.update(peer.env(prefetch))
    env["BENCH_COUNTER"] = key
    probe = pika.BlockingConnection(pika.URLParameters(URL))
    pch = probe.channel()

    def done_count() -> int:
        if use_counter:
            return int(r.get(key) or 0)
        return n - pch.queue_declare(peer.queue, passive=True).method.message_count

    bar = tqdm(total=n, desc=f"{workload:10} {peer.name:9} p={res.prefetch:7} run {run}", unit="task", leave=False)
    t0 = time.monotonic()
    proc = subprocess.Popen(peer.command(prefetch), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    sampler = Sampler(proc.pid)
    sampler.start()
    deadline = t0 + timeout
    seen = 0
    start, start_cpu = (None, 0.0) if from_consumer else (t0, 0.0)
    try:
        while True:
            if start is None and pch.queue_declare(peer.queue, passive=True).method.consumer_count > 0:
                start = time.monotonic()
                sampler.sample()
                start_cpu = sum(sampler.cpu.values())
            c = done_count()
            if c > seen:
                bar.update(c - seen)
                seen = c
            if c >= n:
                break
            if proc.poll() is not None:
                res.note = f"worker exited early with {proc.returncode}: {proc.stderr.read().decode()[-2000:]}"
                break
            if time.monotonic() > deadline:
                res.note = f"timed out after {timeout:g}s at {c} of {n}"
                break
            time.sleep(poll)
        end = time.monotonic()
        if start is None:  # the counter got there before a consumer was seen: time it from the launch
            start, start_cpu = t0, 0.0
            res.note = res.note or "no consumer seen"
        res.elapsed = end - start
        res.consumer_after = start - t0
        bar.close()
        sampler.sample()
        res.cpu_s = sum(sampler.cpu.values()) - start_cpu
        res.startup_cpu_s = start_cpu
        res.peak_rss_mb = sampler.peak_rss / 2**20
        res.connections, res.channels = count_amqp(sampler.amqp_ports())
    finally:
        sampler.stop.set()
        if proc.poll() is None:
            stop(proc)
        probe.close()
    res.rate = n / res.elapsed if res.elapsed else 0.0
    res.counter = int(r.get(key) or 0) if use_counter else -1
    r.delete(key)
    res.left_ready, res.left_unacked = queue_state(peer.queue)
    res.ok = (not res.note and res.left_ready == 0 and res.left_unacked == 0
              and (res.counter == n if use_counter else True))
    if minimum:
        res.theoretical_min = minimum
        res.ratio_to_min = res.elapsed / minimum
    return res


PUBLISH_QUEUES = {"dramatiq": "dramatiq", "dramatiq-confirm": "dramatiq", "celery": "celery"}  # else magne's


def run_publish(name: str, n: int, run: int) -> Result:
    """One run of the publish workload: an empty queue, the peer's enqueueing in its own process
    (bench/publish.py), then the queue must hold exactly n messages. Rate: n / the enqueueing time."""
    import json
    import sys

    from bench import node_peers, peers

    peer = peers.ALL[PUBLISH_QUEUES.get(name, "magne")]()
    res = Result("publish", name, "n/a", run, n)
    reset_queues(peer)
    env = clean_env()
    if name == "dramatiq-confirm":
        env["BENCH_DRAMATIQ_CONFIRM"] = "1"
    cmd = [sys.executable, "-m", "bench.publish", name, str(n)]
    if node_peers.is_node_peer(name):  # the Node.js ceiling and floor, into magne's queue
        cmd = node_peers.command(name, n, peer.queue)
    elif name.startswith("magne-base"):  # the same sends on the code of another commit (see peers.magne_base)
        env["BENCH_MAGNE_BASE"] = os.environ["BENCH_MAGNE_BASE"]
        cmd = [sys.executable, "-m", "bench.base", "bench.publish", name.replace("-base", ""), str(n)]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
    if out.returncode != 0:
        res.note = f"publisher exited with {out.returncode}: {out.stderr[-2000:]}"
        return res
    data = json.loads(out.stdout.strip().splitlines()[-1])
    res.elapsed, res.cpu_s, res.peak_rss_mb = data["elapsed"], data["cpu_s"], data["peak_rss_mb"]
    res.setup_s = data.get("connect_s", 0.0)
    res.rate = n / res.elapsed
    res.connections = res.channels = 0
    deadline = time.monotonic() + 60  # unconfirmed peers: what they wrote may still be on its way in
    while True:
        res.left_ready, res.left_unacked = queue_state(peer.queue)
        if res.left_ready >= n or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    res.counter = res.left_ready
    res.ok = res.left_ready == n and res.left_unacked == 0
    if not res.ok:
        res.note = f"the queue holds {res.left_ready} messages, not {n}"
    conn = pika.BlockingConnection(pika.URLParameters(URL))
    conn.channel().queue_purge(peer.queue)
    conn.close()
    return res
