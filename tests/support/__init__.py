"""Helpers for tests against the real local RabbitMQ and Redis."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pika

URL = os.environ.get("MAGNE_TEST_URL", "amqp://guest:guest@127.0.0.1:5672/%2F")
ROOT = Path(__file__).resolve().parent.parent.parent


def wait_for(cond: Callable[[], Any], timeout: float = 30.0, interval: float = 0.05, what: str = "condition") -> Any:
    """Poll `cond` until it returns something truthy, or fail after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = cond()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


def runs(redis: Any, names: dict[str, str]) -> dict[str, int]:
    """How many times each task argument ran, as the e2e tasks record it in Redis."""
    return {k.decode(): int(v) for k, v in redis.hgetall(names["MAGNE_TEST_KEY"]).items()}


def task_body(func: str, *args: Any, **kwargs: Any) -> bytes:
    from magne import wire

    return wire.encode(func, args, kwargs, wire.new_id())


def unique(prefix: str = "t") -> str:
    return f"{prefix}-{uuid.uuid4().hex[:10]}"


def rabbitmqctl(*args: str, timeout: float = 60) -> str:
    out = subprocess.run(["rabbitmqctl", "-q", *args], capture_output=True, text=True, timeout=timeout)
    if out.returncode != 0:
        raise RuntimeError(f"rabbitmqctl {' '.join(args)} failed: {out.stderr.strip()}")
    return out.stdout


def queue_counts(name: str) -> tuple[int, int]:
    """(ready, unacked) for a queue, from the broker itself."""
    for line in rabbitmqctl("list_queues", "name", "messages_ready", "messages_unacknowledged").splitlines():
        parts = line.split("\t")
        if len(parts) == 3 and parts[0] == name:
            return int(parts[1]), int(parts[2])
    raise AssertionError(f"queue {name} does not exist")


CONSUMING = "magne worker ["  # the start of a worker's consuming connection's name (magne/io/loop.py)


def connections_of(pid: int, role: str | None = CONSUMING) -> list[str]:
    """Names of the broker connections that a process advertised (magne puts its pid in the name): by default its
    consuming connection(s), the subject of invariant 1; role=None: every one (a worker's control plane and events
    ride its publisher's client, magne/control.py, on connections of their own)."""
    names = rabbitmqctl("list_connections", "client_properties").splitlines()
    return [n for n in names if f"pid={pid}" in n and (role is None or role in n)]


def connections_named(part: str) -> list[str]:
    """Broker connections whose advertised name contains `part` (magne names them by their queues)."""
    return [n for n in rabbitmqctl("list_connections", "client_properties").splitlines() if part in n]


def channels_of(pid: int, role: str | None = CONSUMING) -> int:
    """Channels of the process's connections (by default its consuming connection's, as connections_of)."""
    conns = {line.split("\t")[0] for line in rabbitmqctl("list_connections", "pid", "client_properties").splitlines()
             if f"pid={pid}" in line and (role is None or role in line)}
    return sum(1 for line in rabbitmqctl("list_channels", "connection").splitlines() if line.strip() in conns)


class Broker:
    """A pika connection for the test's own publishing and inspection."""

    def __init__(self) -> None:
        self.conn = pika.BlockingConnection(pika.URLParameters(URL))
        self.ch = self.conn.channel()
        self.ch.confirm_delivery()
        self.queues: set[str] = set()
        self.exchanges: set[str] = set()
        self.prefixes: list[str] = []

    def reopen(self) -> None:
        """A fresh connection (after the broker restarted under the test)."""
        try:
            self.conn.close()
        except Exception:
            pass
        self.conn = pika.BlockingConnection(pika.URLParameters(URL))
        self.ch = self.conn.channel()
        self.ch.confirm_delivery()

    def track(self, *queues: str) -> None:
        """Remember queues (and their .dead and exchanges) to delete at the end."""
        for q in queues:
            self.queues.update({q, f"{q}.dead", f"{q}.due"})
            self.exchanges.add(q)

    def publish(self, exchange: str, routing_key: str, body: bytes, **props: Any) -> None:
        props.setdefault("delivery_mode", 2)
        self.ch.basic_publish(exchange, routing_key, body, pika.BasicProperties(**props), mandatory=True)

    def ready(self, queue: str) -> int:
        return self.ch.queue_declare(queue, passive=True).method.message_count

    def get_all(self, queue: str) -> list[tuple[Any, bytes]]:
        out = []
        while True:
            method, props, body = self.ch.basic_get(queue, auto_ack=True)
            if method is None:
                return out
            out.append((props, body))

    def track_prefix(self, prefix: str) -> None:
        """Also delete, at the end, every queue whose name starts with `prefix` (delay queues, say)."""
        self.prefixes.append(prefix)

    def cleanup(self) -> None:
        self.reopen()
        ch = self.ch
        if self.prefixes:
            for name in rabbitmqctl("list_queues", "name").split():
                if name.startswith(tuple(self.prefixes)):
                    self.queues.add(name)
        for q in self.queues:
            ch.queue_delete(q)
        for e in self.exchanges:
            ch.exchange_delete(e)
        self.conn.close()


class WorkerProc:
    """A `magne worker` subprocess logging `--log-format json` to a file.

    Tests read the worker through its structured records (`events`, `counters`,
    `wait_ready`), not by matching log text; `log()` renders the records as text
    for the assertions about what an operator reads, and for failure messages.
    The URL goes in MAGNE_URL, as the README recommends, never in argv.
    """

    def __init__(self, tmp: Path, modules: list[str], *args: str, env: dict[str, str] | None = None,
                 url: str = URL, log_format: str = "json") -> None:
        self.log_path = tmp / f"worker-{uuid.uuid4().hex[:6]}.log"
        full_env = {**os.environ, "PYTHONPATH": f"{ROOT / 'tests' / 'support'}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
                    "MAGNE_URL": url, **(env or {})}
        self._log = open(self.log_path, "w")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "magne", "--log-format", log_format, "worker", *modules, *args],
            stdout=self._log, stderr=subprocess.STDOUT, env=full_env, cwd=tmp,
        )
        self.pid = self.proc.pid

    def records(self) -> list[dict[str, Any]]:
        """Every line the worker (and its children) wrote; a line that is not JSON becomes {"raw": line}."""
        out: list[dict[str, Any]] = []
        for line in self.log_path.read_text().splitlines():
            try:
                rec = json.loads(line)
            except ValueError:
                rec = None
            out.append(rec if isinstance(rec, dict) else {"raw": line})
        return out

    def events(self, name: str) -> list[dict[str, Any]]:
        return [r for r in self.records() if r.get("event") == name]

    def counters(self) -> dict[str, int]:
        """The I/O thread's counters from the last `stopped` (or `status`) record."""
        recs = [r for r in self.records() if r.get("event") in ("stopped", "status") and "counters" in r]
        assert recs, f"no counters reported yet:\n{self.log()}"
        return recs[-1]["counters"]

    def log(self) -> str:
        lines = []
        for r in self.records():
            if "raw" in r:
                lines.append(r["raw"])
                continue
            lines.append(f"{r.get('time')} {str(r.get('level')).upper()} [{r.get('pid')} {r.get('thread')}] "
                         f"{r.get('logger')}: {r.get('message')}")
            if r.get("traceback"):
                lines.append(r["traceback"])
        return "\n".join(lines) + "\n"

    def wait_ready(self, timeout: float = 30) -> None:
        def ready() -> bool:
            if self.proc.poll() is not None:
                raise AssertionError(f"worker exited with {self.proc.returncode} before ready:\n{self.log()}")
            return bool(self.events("ready")) or " ready: " in self.log()  # json, or --log-format text
        wait_for(ready, timeout, what="worker ready")

    def signal(self, sig: int = signal.SIGTERM) -> None:
        self.proc.send_signal(sig)

    def wait(self, timeout: float = 60) -> int:
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"worker did not exit within {timeout}s:\n{self.log()}") from None

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.signal(signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()
        return self.proc.returncode
