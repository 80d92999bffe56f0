"""`magne status`: how much work is waiting and how fast it goes, for an operator at a terminal.

For the queues of a task module (or --queues): ready and unacked messages, consumers and
rates, with each queue's dead-letter and delay queues beside it. Two sources, and the
report says which one it used:

- the RabbitMQ management HTTP API, when the management plugin answers (default: the broker
  host's port 15672, with the broker URL's user and password; --management to name another):
  ready, unacked, consumers with their connections and prefetch, the broker's own message rates
  (it averages them over its statistics interval, 5 s by default), every delay queue;
- passive declares over AMQP otherwise: only ready and consumers exist there, so the report
  says so; the rate it shows is the net change of ready messages over a short sample
  (--sample seconds), and delay queues cannot be listed.

With --metrics URL (a worker's or a supervisor's `--metrics` endpoint, repeatable) it also
shows each worker process: its node, threads busy/live/lost, and each running task with its
age (read from the Prometheus text; prometheus_client parses it).

--watch refreshes the report in place until Ctrl-C; --format json prints one JSON object per
refresh (what the tests read). Runs on the caller's thread only; every network call has a
timeout.
"""

from __future__ import annotations

import base64
import dataclasses
import datetime
import json
import signal
import sys
import time
import urllib.error
import urllib.parse
from typing import Any

from magne import schedule_status, topology
from magne.amqp.errors import AMQPError, ChannelClosed
from magne.amqp.url import Nodes, Params, parse_urls
from magne.engine.client import Client
from magne.errors import ConfigError

HTTP_TIMEOUT = 3.0
CLEAR = "\x1b[H\x1b[J"  # cursor home, clear to the end: a refresh in place


@dataclasses.dataclass
class QueueStatus:
    name: str
    exists: bool = True
    ready: int | None = None
    unacked: int | None = None  # None: not known from this source (AMQP)
    consumers: int | None = None
    rates: dict[str, float] | None = None  # per second: publish, deliver, ack, redeliver (HTTP) or ready_change (AMQP)
    dead: dict[str, Any] | None = None  # {"ready": n} of <queue>.dead, or {"exists": False}
    delayed: dict[str, Any] | None = None  # {"queues": k, "ready": n} over the delay queues; None: not known (AMQP)
    consumer_details: list[dict[str, Any]] = dataclasses.field(default_factory=list)


@dataclasses.dataclass
class WorkerStatus:
    url: str
    process: str  # "" for a lone worker, else the supervisor's process slot
    ok: bool = True
    error: str = ""
    node: str = ""
    pid: str = ""
    busy: int = 0
    live: int = 0
    threads: int = 0
    lost: int = 0
    waiting: int = 0
    running: list[dict[str, Any]] = dataclasses.field(default_factory=list)  # {"slot", "task", "seconds"}


@dataclasses.dataclass
class Report:
    time: str
    source: str  # "http" or "amqp"
    source_detail: str
    queues: list[QueueStatus]
    workers: list[WorkerStatus]
    schedules: list[dict[str, Any]] = dataclasses.field(default_factory=list)  # magne.schedule_status

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# -- the management API --------------------------------------------------------------------
class Management:
    """A minimal client of the RabbitMQ management HTTP API (standard library only)."""

    def __init__(self, base: str, params: Params) -> None:
        parts = urllib.parse.urlsplit(base)
        user = urllib.parse.unquote(parts.username) if parts.username else params.username
        password = urllib.parse.unquote(parts.password) if parts.password else params.password
        host = parts.hostname or params.host
        netloc = f"[{host}]" if ":" in host else host
        if parts.port:
            netloc += f":{parts.port}"
        self.base = urllib.parse.urlunsplit((parts.scheme or "http", netloc, parts.path.rstrip("/"), "", ""))
        self.auth = "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()
        self.vhost = urllib.parse.quote(params.vhost, safe="")

    def get(self, path: str) -> Any:
        from urllib.request import Request, urlopen  # here: at the top it cost every worker 16 ms of start-up

        req = Request(self.base + path, headers={"Authorization": self.auth})
        with urlopen(req, timeout=HTTP_TIMEOUT) as resp:
            return json.loads(resp.read())

    def overview(self) -> dict[str, Any]:
        return self.get("/api/overview")

    def queues(self) -> dict[str, dict[str, Any]]:
        cols = ("name,messages_ready,messages_unacknowledged,consumers,message_stats.publish_details.rate,"
                "message_stats.deliver_get_details.rate,message_stats.ack_details.rate,"
                "message_stats.redeliver_details.rate")
        return {q["name"]: q for q in self.get(f"/api/queues/{self.vhost}?columns={cols}")}

    def queue(self, name: str) -> dict[str, Any]:
        return self.get(f"/api/queues/{self.vhost}/{urllib.parse.quote(name, safe='')}")

    def connection_names(self) -> dict[str, str]:
        """Broker connection name -> the name the client gave it (magne: "magne worker [QUEUES] pid=N")."""
        out = {}
        for c in self.get("/api/connections?columns=name,client_properties"):
            given = (c.get("client_properties") or {}).get("connection_name")
            if isinstance(given, str):
                out[c.get("name", "")] = given
        return out


def default_management_url(params: Params) -> str:
    return f"https://{params.host}:15671" if params.tls else f"http://{params.host}:15672"


def _why(exc: BaseException) -> str:
    if isinstance(exc, urllib.error.HTTPError):
        return f"HTTP {exc.code} {exc.reason}"
    if isinstance(exc, urllib.error.URLError):
        return str(getattr(exc.reason, "strerror", None) or exc.reason)
    return f"{type(exc).__name__}: {exc}"


def _rate(q: dict[str, Any], key: str) -> float:
    v = q.get(f"message_stats.{key}_details.rate")
    if v is None:
        v = ((q.get("message_stats") or {}).get(f"{key}_details") or {}).get("rate")
    return float(v or 0.0)


def from_http(api: Management, names: list[str]) -> list[QueueStatus]:
    everything = api.queues()
    conns: dict[str, str] | None = None
    out = []
    for name in names:
        q = everything.get(name)
        st = QueueStatus(name, exists=q is not None)
        if q is not None:
            st.ready = int(q.get("messages_ready") or 0)
            st.unacked = int(q.get("messages_unacknowledged") or 0)
            st.consumers = int(q.get("consumers") or 0)
            st.rates = {k: _rate(q, k) for k in ("publish", "deliver_get", "ack", "redeliver")}
            if st.consumers:
                if conns is None:
                    conns = api.connection_names()
                try:
                    details = api.queue(name).get("consumer_details") or []
                except (urllib.error.URLError, OSError, ValueError):
                    details = []
                for c in details:
                    ch = c.get("channel_details") or {}
                    broker_name = ch.get("connection_name", "")
                    st.consumer_details.append({
                        "connection": conns.get(broker_name, broker_name), "peer": f"{ch.get('peer_host')}:"
                        f"{ch.get('peer_port')}", "prefetch": c.get("prefetch_count"),
                        "consumer_tag": c.get("consumer_tag"), "active": c.get("active", True)})
        dq = everything.get(topology.dead_queue(name))
        st.dead = {"exists": False} if dq is None else {"exists": True, "ready": int(dq.get("messages_ready") or 0)}
        # The wait queues (and the earlier `.delay.` ones), and the due queue: fallen due, about to run.
        delays = [v for k, v in everything.items() for prefix in (f"{name}.wait.", f"{name}.delay.")
                  if k.startswith(prefix) and k[len(prefix):].isdigit()]
        due = everything.get(topology.due_queue(name))
        st.delayed = {"queues": len(delays), "ready": sum(int(v.get("messages_ready") or 0) for v in delays),
                      "due": int(due.get("messages_ready") or 0) if due else 0}
        out.append(st)
    return out


# -- passive declares over AMQP ----------------------------------------------------------------------
def _amqp_client(nodes: Nodes) -> Client:
    while True:
        client = Client(Nodes([nodes.current], start=0), "magne status")
        try:
            return client.open()
        except AMQPError as exc:
            client.close(1.0)
            if exc.permanent or nodes.failed():
                raise


def _passive(client: Client, name: str) -> tuple[int, int] | None:
    """(ready, consumers), or None if the queue does not exist (the 404 closes the channel: open it again)."""
    try:
        return client.queue_counts(name)
    except ChannelClosed as exc:
        if exc.code != 404:
            raise
        return None  # the session's channel opens again for the next call


def from_amqp(nodes: Nodes, names: list[str], sample: float) -> list[QueueStatus]:
    client = _amqp_client(nodes)
    try:
        first = {n: _passive(client, n) for n in names}
        t0 = time.monotonic()
        if sample > 0:
            time.sleep(sample)
        second = {n: _passive(client, n) for n in names}
        dt = max(1e-6, time.monotonic() - t0)
        out = []
        for name in names:
            a, b = first[name], second[name]
            st = QueueStatus(name, exists=b is not None)
            if b is not None:
                st.ready, st.consumers = b
                if a is not None and sample > 0:
                    st.rates = {"ready_change": (b[0] - a[0]) / dt}
            dead = _passive(client, topology.dead_queue(name))
            st.dead = {"exists": False} if dead is None else {"exists": True, "ready": dead[0]}
            out.append(st)
        return out
    finally:
        client.close()


# -- the workers' metrics ------------------------------------------------------------------------------
def workers_from(url: str) -> list[WorkerStatus]:
    """Each worker process behind one --metrics endpoint (a lone worker, or a supervisor's whole tree)."""
    try:
        from prometheus_client.parser import text_string_to_metric_families
    except ImportError:  # pragma: no cover - a core dependency; only a broken install lacks it
        return [WorkerStatus(url, "", ok=False, error="prometheus_client is not installed")]
    target = url if "://" in url else f"http://{url}"
    if urllib.parse.urlsplit(target).path in ("", "/"):
        target = target.rstrip("/") + "/metrics"
    from urllib.request import urlopen  # here: see Management.get

    try:
        with urlopen(target, timeout=HTTP_TIMEOUT) as resp:
            text = resp.read().decode("utf-8")
    except (urllib.error.URLError, OSError, ValueError) as exc:
        return [WorkerStatus(target, "", ok=False, error=_why(exc))]
    procs: dict[str, WorkerStatus] = {}

    def proc(labels: dict[str, str]) -> WorkerStatus | None:
        p = labels.get("process", "")
        if p in ("all", "supervisor"):
            return None
        if p not in procs:
            procs[p] = WorkerStatus(target, p)
        return procs[p]

    try:
        for fam in text_string_to_metric_families(text):
            for s in fam.samples:
                w = proc(s.labels)
                if w is None:
                    continue
                if s.name == "magne_worker_info":
                    w.node, w.pid = s.labels.get("node", ""), s.labels.get("pid", "")
                elif s.name == "magne_tasks_running":
                    w.busy = int(s.value)
                elif s.name == "magne_threads_live":
                    w.live = int(s.value)
                elif s.name == "magne_threads":
                    w.threads = int(s.value)
                elif s.name == "magne_threads_lost_total":
                    w.lost = int(s.value)
                elif s.name == "magne_messages_waiting":
                    w.waiting = int(s.value)
                elif s.name == "magne_task_running_seconds":
                    w.running.append({"slot": int(s.labels.get("slot", "0")), "task": s.labels.get("task", ""),
                                      "seconds": round(s.value, 3)})
    except ValueError as exc:
        return [WorkerStatus(target, "", ok=False, error=f"not Prometheus text: {exc}")]
    out = sorted(procs.values(), key=lambda w: (len(w.process), w.process))
    for w in out:
        w.running.sort(key=lambda r: -r["seconds"])
    return out or [WorkerStatus(target, "", ok=False, error="no magne worker metrics there")]


# -- gathering and rendering -------------------------------------------------------------------------------
def gather(queues: list[str], url: str | list[str] | None, source: str = "auto", management: str | None = None,
           metrics: list[str] | None = None, sample: float = 1.0) -> Report:
    nodes = Nodes(parse_urls(url))
    params = nodes.current
    now = datetime.datetime.now().astimezone().isoformat(timespec="seconds")
    workers = [w for m in (metrics or []) for w in workers_from(m)]
    why_not = ""
    if source in ("auto", "http"):
        api = Management(management or default_management_url(params), params)
        try:
            ov = api.overview()
            detail = (f"management API at {api.base} (RabbitMQ {ov.get('rabbitmq_version') or ov.get('product_version')}, "
                      f"node {ov.get('node', '?')})")
            return Report(now, "http", detail, from_http(api, queues), workers)
        except (urllib.error.URLError, OSError, ValueError) as exc:
            why_not = f"management API not reachable at {api.base}: {_why(exc)}"
            if source == "http":
                raise ConfigError(why_not) from None
    detail = f"passive declares over AMQP to {params.safe_url()} (ready and consumers only"
    detail += f"; {why_not})" if why_not else ")"
    return Report(now, "amqp", detail, from_amqp(nodes, queues, sample), workers)


def _n(v: int | None) -> str:
    return "-" if v is None else f"{v:,}"


def render(r: Report) -> str:
    lines = [f"magne status at {r.time}", f"source: {r.source_detail}", ""]
    if r.source == "http":
        head = ("queue", "ready", "unacked", "consumers", "publish/s", "deliver/s", "ack/s", "dead", "delayed")
    else:
        head = ("queue", "ready", "consumers", "ready Δ/s", "dead")
    rows: list[tuple[str, ...]] = [head]
    for q in r.queues:
        if not q.exists:
            rows.append((q.name, "(no such queue)", *[""] * (len(head) - 2)))
            continue
        dead = _n(q.dead.get("ready")) if q.dead and q.dead.get("exists") else "-"
        if r.source == "http":
            rates = q.rates or {}
            delayed = f"{q.delayed['ready']:,} in {q.delayed['queues']}" if q.delayed and q.delayed["queues"] else "0"
            if q.delayed and q.delayed.get("due"):
                delayed += f", {q.delayed['due']:,} due"
            rows.append((q.name, _n(q.ready), _n(q.unacked), _n(q.consumers), f"{rates.get('publish', 0):.1f}",
                         f"{rates.get('deliver_get', 0):.1f}", f"{rates.get('ack', 0):.1f}", dead, delayed))
        else:
            change = f"{q.rates['ready_change']:+.1f}" if q.rates else "-"
            rows.append((q.name, _n(q.ready), _n(q.consumers), change, dead))
    widths = [max(len(row[i]) for row in rows) for i in range(len(head))]
    for i, row in enumerate(rows):
        cells = [row[0].ljust(widths[0])] + [c.rjust(w) for c, w in zip(row[1:], widths[1:], strict=True)]
        lines.append("  ".join(cells).rstrip())
        if i == 0:
            continue
        q = r.queues[i - 1]
        for c in q.consumer_details:
            lines.append(f"    consumer {c['connection']} from {c['peer']}, prefetch {c['prefetch']}"
                         f"{'' if c.get('active', True) else ' (inactive)'}")
    if r.source == "http":
        lines.append("(rates: the broker's, averaged over its statistics interval; delayed: messages waiting in the "
                     "queue's wait queues, and those fallen due in <queue>.due, about to run)")
    if r.workers:
        lines += ["", "workers:"]
        for w in r.workers:
            where = f"{w.url}" + (f" process {w.process}" if w.process else "")
            if not w.ok:
                lines.append(f"  {where}: {w.error}")
                continue
            lines.append(f"  {where}: pid {w.pid}, node {w.node}, threads busy {w.busy} / live {w.live} of {w.threads}, "
                         f"lost {w.lost}; {w.waiting} prefetched waiting")
            if w.running:
                shown = ", ".join(f"{x['task']} {x['seconds']:.1f}s" for x in w.running[:12])
                more = f" and {len(w.running) - 12} more" if len(w.running) > 12 else ""
                lines.append(f"    running: {shown}{more}")
    return "\n".join(lines + schedule_status.render(r.schedules))


def run(queues: list[str], url: str | list[str] | None, source: str, management: str | None, metrics: list[str] | None,
        sample: float, watch: float | None, fmt: str, scheduled: list[Any] | None = None,
        stream: str = "magne.schedule") -> int:
    """The command: once, or every `watch` seconds until SIGINT/SIGTERM (then exit 0). Main thread."""
    stop = []

    def on_signal(_s: int, _f: Any) -> None:
        stop.append(True)

    if watch:
        signal.signal(signal.SIGINT, on_signal)
        signal.signal(signal.SIGTERM, on_signal)
    while True:
        started = time.monotonic()
        report = gather(queues, url, source, management, metrics, sample)
        if scheduled:
            report.schedules = schedule_status.gather(url, scheduled, stream)
        if fmt == "json":
            sys.stdout.write(json.dumps(report.as_dict()) + "\n")
        else:
            sys.stdout.write((CLEAR if watch else "") + render(report) + "\n")
        sys.stdout.flush()
        if not watch:
            return 0
        while not stop and time.monotonic() - started < watch:
            time.sleep(0.05)
        if stop:
            return 0
