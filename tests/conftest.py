from __future__ import annotations

import os
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis as redis_lib

from magne.publisher import Publisher
from support import URL, Broker, WorkerProc, unique
from support.control_env import isolate, own_results_stream

# Tests are grouped by what they need: tests/unit runs in seconds with no broker;
# tests/e2e and tests/faults talk to the real RabbitMQ (and Redis) on this machine.
_MARK_BY_DIR = {"e2e": "broker", "faults": "broker", "cluster": "cluster"}


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Mark every test under tests/e2e and tests/faults `broker`, so `-m "not broker"` runs the unit tests alone."""
    for item in items:
        part = Path(str(item.fspath)).parent.name
        mark = _MARK_BY_DIR.get(part)
        if mark:
            item.add_marker(getattr(pytest.mark, mark))


@pytest.fixture(autouse=True)
def _flush_magne_logs() -> Iterator[None]:
    """Hand a test's log records to the handlers before its capture closes (magne's own threads log through
    the magne-log writer thread; a record handled after pytest closed the test's capture is a 'Logging error')."""
    yield
    from magne import logs

    logs.flush(1.0)


@pytest.fixture
def broker() -> Iterator[Broker]:
    b = Broker()
    yield b
    b.cleanup()


@pytest.fixture
def pub() -> Iterator[Publisher]:
    """A magne Publisher on the test broker, closed at the end of the test."""
    p = Publisher(URL)
    yield p
    p.close()


@pytest.fixture
def redis() -> Iterator[redis_lib.Redis]:
    r = redis_lib.Redis(host="127.0.0.1", port=6379)
    yield r
    r.close()


@pytest.fixture
def names(broker: Broker, redis: redis_lib.Redis) -> Iterator[dict[str, str]]:
    """Per-test queue names and Redis key, passed to tests/support/e2e_tasks.py through the environment."""
    prefix = unique("magne-test")
    orig = f"orig_{uuid.uuid4().hex[:8]}"
    n = {
        "MAGNE_TEST_PREFIX": prefix,
        "MAGNE_TEST_KEY": f"{prefix}:runs",
        "MAGNE_TEST_ORIG": orig,
        "main": f"{prefix}.main",
        "slow": f"{prefix}.slow",
        "orig": orig.upper(),
    }
    broker.track(n["main"], n["slow"], n["orig"])
    broker.track_prefix(prefix)
    yield n
    redis.delete(*[f"{prefix}:{k}" for k in ("runs", "started", "attempts", "fixed", "at", "version", "alarm")])


@pytest.fixture
def start_worker(tmp_path: Path, names: dict[str, str]) -> Iterator:
    workers: list[WorkerProc] = []

    def start(*args: str, modules: tuple[str, ...] = ("e2e_tasks",), env: dict[str, str] | None = None,
              **kw: str) -> WorkerProc:
        e = {k: v for k, v in names.items() if k.startswith("MAGNE_")}
        e.update(env or {})
        w = WorkerProc(tmp_path, list(modules), *args, env=e, **kw)
        workers.append(w)
        return w

    yield start
    for w in workers:
        w.stop()
    if os.environ.get("MAGNE_TEST_SHOW_LOGS"):
        for w in workers:
            print(w.log())


@pytest.fixture(scope="module")
def tls_nodes() -> Iterator[dict[str, object]]:
    """Three RabbitMQ nodes with TLS listeners, next to the broker on 5672 (never touching it):
    "open" (client certificate optional), "strict" (client certificate required) and "expired"
    (serving an expired certificate). They start in parallel (about 10 s). Certificates
    are made for the run by tests/support/nodes.py."""
    from support.nodes import TLSNode, kill_leftovers, make_certs

    kill_leftovers()
    base = Path(tempfile.mkdtemp(prefix="magnetest-tls-"))
    certs = make_certs(base / "certs")
    nodes = {"open": TLSNode("magnetest-tls1@localhost", 5690, 25690, tls_port=5691, certs=certs),
             "strict": TLSNode("magnetest-tls2@localhost", 5692, 25692, tls_port=5693, certs=certs,
                               require_client_cert=True),
             "expired": TLSNode("magnetest-tls3@localhost", 5694, 25694, tls_port=5695, certs=certs, expired=True)}
    try:
        for n in nodes.values():
            n.spawn()
        for n in nodes.values():
            n.wait_started(90)
        yield {"certs": certs, **nodes}
    finally:
        for n in nodes.values():
            n.close()
        shutil.rmtree(base, ignore_errors=True)


@pytest.fixture(scope="module")
def cluster() -> Iterator[object]:
    """A 3-node RabbitMQ cluster on 127.0.0.1:5682-5684 (about 15 s to start), next to the broker on 5672."""
    from support.nodes import Cluster, kill_leftovers

    kill_leftovers()
    c = Cluster(3).start()
    try:
        yield c
    finally:
        c.close()


@pytest.fixture
def aq(broker: Broker, redis: redis_lib.Redis, names: dict[str, str]) -> Iterator[dict[str, str]]:
    """The queues of tests/support/async_tasks.py for this test (under its own prefix), removed afterwards."""
    p = names["MAGNE_TEST_PREFIX"]
    q = {"aio": f"{p}.aio", "sync": f"{p}.sync", "mixed": f"{p}.mixed", "prefix": p}
    broker.track(q["aio"], q["sync"], q["mixed"])
    yield q
    keys = list(redis.scan_iter(match=f"{p}:*"))
    if keys:
        redis.delete(*keys)


@pytest.fixture
def fleet(names: dict[str, str], broker: Broker, monkeypatch: pytest.MonkeyPatch) -> Iterator[dict[str, str]]:
    """Per-test cancels, events and results streams and control exchange, for this process and the workers it starts
    (tests/support/control_env.py); a test module may define a narrower one of its own."""
    isolate(names, broker, monkeypatch)
    with own_results_stream(names, broker):
        yield names
