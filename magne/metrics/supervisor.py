"""The supervisor's metrics: scrapes its children and shows every series per process and summed."""

from __future__ import annotations

import os
import queue as queue_mod
import threading
import time
import urllib.request
from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry, ProcessCollector
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.registry import Collector

if TYPE_CHECKING:
    pass

from magne.metrics.base import CHILD_TIMEOUT, REFRESH, log, parse_listen, serve, url_of

_CUMULATIVE = frozenset({"counter", "histogram", "summary"})
# Families that make no sense summed over processes (identities, ages, limits).
_NOT_SUMMED = frozenset({"magne_worker_info", "magne_task_running_seconds", "process_start_time_seconds",
                         "process_max_fds"})

Key = tuple[str, tuple[tuple[str, str], ...]]  # (sample name, sorted labels)


class _Family:
    __slots__ = ("name", "doc", "type")

    def __init__(self, name: str, doc: str, typ: str) -> None:
        self.name, self.doc, self.type = name, doc, typ


def parse(text: str) -> tuple[dict[str, _Family], dict[Key, float], dict[Key, str]]:
    """A child's exposition -> (families by name, sample values, sample key -> its family's name)."""
    families: dict[str, _Family] = {}
    values: dict[Key, float] = {}
    owner: dict[Key, str] = {}
    for fam in text_string_to_metric_families(text):
        families[fam.name] = _Family(fam.name, fam.documentation, fam.type)
        for s in fam.samples:
            if s.name.endswith("_created"):
                continue
            key = (s.name, tuple(sorted(s.labels.items())))
            values[key] = s.value
            owner[key] = fam.name
    return families, values, owner


class _Child:
    __slots__ = ("slot", "pid", "port", "values", "owner", "at")

    def __init__(self, slot: int, pid: int, port: int) -> None:
        self.slot, self.pid, self.port = slot, pid, port
        self.values: dict[Key, float] = {}
        self.owner: dict[Key, str] = {}
        self.at = 0.0  # when the request whose answer `values` holds was sent (0: never)


class SupervisorMetrics(Collector):
    """The supervisor's one endpoint for the whole tree (see the module docstring for why and how).

    The supervisor's main loop only calls `child_up` / `child_down` / `restarted`, which put events on a
    SimpleQueue (no lock, never blocks). The HTTP server's threads (`collect`) and the `magne-metrics-poll`
    thread apply them and fetch the children's metrics; they share `_lock`, which guards only dict updates
    and is never held across a network call. No task code runs in the supervisor.
    """

    def __init__(self, listen: str, final_dir: str) -> None:
        self.host, self.port = parse_listen(listen)
        self.final_dir = final_dir
        self.events: queue_mod.SimpleQueue[tuple[Any, ...]] = queue_mod.SimpleQueue()
        self._lock = threading.Lock()
        self.children: dict[int, _Child] = {}  # pid -> live child with a known port
        self.offsets: dict[int, dict[Key, float]] = {}  # slot -> counters kept from its children that went away
        self.offset_owner: dict[Key, str] = {}
        self.families: dict[str, _Family] = {}
        self.restarts: dict[int, int] = {}
        self.registry = CollectorRegistry(auto_describe=False)
        self.server: Any = None
        self.bound = 0
        self._stop = threading.Event()

    # -- the supervisor's main loop ------------------------------------------------------------------
    def child_up(self, slot: int, pid: int, port: int) -> None:
        self.events.put(("up", slot, pid, port))

    def child_down(self, pid: int) -> None:
        self.events.put(("down", pid))

    def restarted(self, slot: int) -> None:
        self.events.put(("restart", slot))

    def start(self) -> int:
        """Main thread: listen, and start the poller. Returns the bound port."""
        own = _Own(self)
        self.registry.register(own)
        self.server, self.bound = serve(self.registry, self.host, self.port)
        threading.Thread(target=self._poll, name="magne-metrics-poll", daemon=True).start()
        return self.bound

    def stop(self) -> None:
        self._stop.set()
        if self.server is not None:
            try:
                self.server.shutdown()
                self.server.server_close()
            except Exception:
                pass

    @property
    def url(self) -> str:
        return url_of(self.host, self.bound)

    # -- the HTTP and poller threads -----------------------------------------------------------------
    def _poll(self) -> None:
        while not self._stop.wait(REFRESH):
            try:
                self.refresh()
            except Exception as exc:  # never let the poller die
                log.warning("refreshing the worker processes' metrics failed: %s", exc)

    def _apply_events(self) -> None:
        """Under _lock: take in what the supervisor loop reported."""
        while True:
            try:
                ev = self.events.get_nowait()
            except queue_mod.Empty:
                return
            if ev[0] == "up":
                _, slot, pid, port = ev
                self.children[pid] = _Child(slot, pid, port)
            elif ev[0] == "down":
                child = self.children.pop(ev[1], None)
                if child is not None:
                    self._retire(child)
            elif ev[0] == "restart":
                self.restarts[ev[1]] = self.restarts.get(ev[1], 0) + 1

    def _retire(self, child: _Child) -> None:
        """Under _lock: a child went away; keep its counters in its slot's offset. Its final file, if it left one,
        is newer than our last scrape."""
        path = os.path.join(self.final_dir, f"{child.pid}.prom")
        try:
            with open(path, encoding="utf-8") as f:
                families, values, owner = parse(f.read())
            self.families.update(families)
            child.values, child.owner = values, owner
        except (OSError, ValueError):
            pass
        finally:
            for p in (path, path + ".tmp"):
                try:
                    os.unlink(p)
                except OSError:
                    pass
        offset = self.offsets.setdefault(child.slot, {})
        for key, value in child.values.items():
            fam = self.families.get(child.owner.get(key, ""))
            if fam is not None and fam.type in _CUMULATIVE:
                offset[key] = offset.get(key, 0.0) + value
                self.offset_owner[key] = fam.name

    def refresh(self) -> None:
        """Fetch every live child's metrics (outside the lock); keep the newest good answer of each. The poller and
        the HTTP server's threads (a scrape) call it, possibly at once: an answer is kept only if its request began
        after the one of the answer it would replace, so a slow older scrape never takes a counter backwards."""
        with self._lock:
            self._apply_events()
            targets = [(c.pid, c.port) for c in self.children.values()]
        got: dict[int, tuple[dict[str, _Family], dict[Key, float], dict[Key, str]]] = {}
        asked: dict[int, float] = {}
        for pid, port in targets:
            asked[pid] = time.monotonic()
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=CHILD_TIMEOUT) as resp:
                    got[pid] = parse(resp.read().decode("utf-8"))
            except Exception:
                continue  # gone or busy: its last values stand in
        with self._lock:
            self._apply_events()  # a child that went away meanwhile is retired with its previous values
            for pid, (families, values, owner) in got.items():
                child = self.children.get(pid)
                if child is None or asked[pid] <= child.at:
                    continue  # gone, or another thread kept a newer answer meanwhile
                self.families.update(families)
                child.values, child.owner, child.at = values, owner, asked[pid]

    def merged(self, own: Iterable[Metric] = ()) -> tuple[dict[str, _Family], dict[str, dict[Key, float]]]:
        """(families, family name -> {(sample, labels with process): value}): each child's series with its slot as
        `process` (its slot's offset added to counters), the supervisor's own `own` metrics as
        process="supervisor", and their sums as process="all". Under _lock."""
        families = dict(self.families)
        per_process: dict[str, dict[Key, float]] = {}
        owner: dict[Key, str] = dict(self.offset_owner)
        for slot, offset in self.offsets.items():
            per_process[str(slot)] = dict(offset)
        for child in self.children.values():
            acc = per_process.setdefault(str(child.slot), {})
            for key, value in child.values.items():
                acc[key] = acc.get(key, 0.0) + value
                owner[key] = child.owner.get(key, "")
        mine = per_process.setdefault("supervisor", {})
        for m in own:
            families.setdefault(m.name, _Family(m.name, m.documentation, m.type))
            for smp in m.samples:
                key = (smp.name, tuple(sorted(smp.labels.items())))
                mine[key] = smp.value
                owner[key] = m.name
        out: dict[str, dict[Key, float]] = {}
        for process, values in sorted(per_process.items()):
            for (name, labels), value in values.items():
                fam = owner.get((name, labels), "")
                if fam not in families:
                    continue
                series = out.setdefault(fam, {})
                series[(name, tuple(sorted((*labels, ("process", process)))))] = value
                if fam not in _NOT_SUMMED:
                    total = (name, tuple(sorted((*labels, ("process", "all")))))
                    series[total] = series.get(total, 0.0) + value
        return families, out


class _Own(Collector):
    """The supervisor endpoint's collector: every child's series with `process`, the sums, and its own counters."""

    def __init__(self, sup: SupervisorMetrics) -> None:
        self.sup = sup
        self.process = ProcessCollector(registry=None)

    def collect(self) -> Iterator[Metric]:
        sup = self.sup
        sup.refresh()
        own = list(self.process.collect())  # the supervisor's own CPU and memory, as process="supervisor"
        with sup._lock:
            families, out = sup.merged(own)
            restarts = dict(sup.restarts)
            alive = len(sup.children)
        for name in sorted(out):
            fam = families[name]
            metric = Metric(fam.name, fam.doc, fam.type)
            for (sample, labels), value in sorted(out[name].items()):
                metric.add_sample(sample, dict(labels), value)
            yield metric
        procs = GaugeMetricFamily("magne_supervisor_processes", "Worker processes whose metrics the supervisor reads.")
        procs.add_metric([], alive)
        yield procs
        fam = CounterMetricFamily("magne_supervisor_restarts", "Worker processes restarted after they died, by process "
                                  "slot.", labels=["process"])
        for slot, v in sorted(restarts.items()):
            fam.add_metric([str(slot)], v)
        yield fam
