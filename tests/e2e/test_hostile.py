"""Hostile inputs and hostile task code, end to end against the real broker.

Each test is a regression test for one defect: a message, a header, a task or a broker
event that today's worker mishandles (drops a message, runs it twice, loses a thread,
hangs, or dies). The worker runs as users run it (`magne worker`, a subprocess) with the
tasks of tests/support/hostile_tasks.py; what is checked is what users see: the broker's
queues, the dead letters and their headers, the Redis counters the tasks write, the
worker's exit code and how fast it stops.
"""

from __future__ import annotations

import ctypes
import datetime
import decimal
import gzip
import re
import signal
import struct
import subprocess
import threading
import time
import uuid

import orjson
import pika.data
import pytest
from pamqp import commands

import magne
from support import URL, queue_counts, rabbitmqctl, runs, task_body, wait_for

MODULES = ("hostile_tasks",)


# -- helpers ---------------------------------------------------------------------------

@pytest.fixture
def hworker(start_worker, broker, names):
    """start_worker with the hostile tasks, and a bounded stop: a worker that hangs is killed after 5 s
    (the shared fixture would wait a minute for it). The worker declares every queue of hostile_tasks,
    qa and qb included: their exchanges are removed at the end too."""
    broker.track(*(f"{names['MAGNE_TEST_PREFIX']}.{q}" for q in ("qa", "qb")))
    started = []

    def start(*args: str, modules: tuple[str, ...] = MODULES, **kw: str):
        w = start_worker(*args, modules=modules, **kw)
        started.append(w)
        return w

    yield start
    for w in started:
        if w.proc.poll() is None:
            w.signal(signal.SIGTERM)
            try:
                w.proc.wait(5)
            except subprocess.TimeoutExpired:
                w.proc.kill()
                w.proc.wait()


@pytest.fixture
def pika_doubles(monkeypatch):
    """pika cannot write a Python float into a header table, and reads AMQP doubles ('d') and floats ('f')
    back as int (pika/data.py: `long(struct.unpack_from('>d', ...))`). The tests that send doubles teach
    the test's own pika client to write floats as 'd' and read 'd'/'f' as float, nothing else."""
    encode_value, decode_value = pika.data.encode_value, pika.data.decode_value

    def encode(pieces, value):
        if type(value) is float:
            pieces.append(struct.pack(">cd", b"d", value))
            return 9
        return encode_value(pieces, value)

    def decode(encoded, offset):
        kind = encoded[offset:offset + 1]
        if kind == b"d":
            return struct.unpack_from(">d", encoded, offset + 1)[0], offset + 9
        if kind == b"f":
            return struct.unpack_from(">f", encoded, offset + 1)[0], offset + 5
        return decode_value(encoded, offset)

    monkeypatch.setattr(pika.data, "encode_value", encode)
    monkeypatch.setattr(pika.data, "decode_value", decode)


def alive(w) -> bool:
    """True while the worker runs; fails the test at once (with its log) when it has exited."""
    if w.proc.poll() is not None:
        raise AssertionError(f"the worker exited with {w.proc.returncode}; end of its log:\n{w.log()[-4000:]}")
    return True


def attempts(redis, names) -> dict[str, int]:
    return {k.decode(): int(v) for k, v in redis.hgetall(f"{names['MAGNE_TEST_PREFIX']}:attempts").items()}


def started(redis, names) -> dict[str, int]:
    return {k.decode(): int(v) for k, v in redis.hgetall(f"{names['MAGNE_TEST_PREFIX']}:started").items()}


def queue_exists(name: str) -> bool:
    """Without a passive declare (a 404 would close the test's pika channel)."""
    return name in rabbitmqctl("list_queues", "name").split()


def dead_letters(broker, w, queue: str, n: int, timeout: float = 15) -> list[tuple]:
    """Wait for n dead letters in <queue>.dead (the worker must stay alive meanwhile); take them all."""
    dq = queue + ".dead"
    wait_for(lambda: alive(w) and broker.ready(dq) >= n, timeout, what=f"{n} dead letters in {dq}")
    got = broker.get_all(dq)
    assert len(got) == n, f"expected {n} dead letters, got {len(got)}"
    return got


def by_first_arg(got: list[tuple]) -> dict[str, tuple]:
    return {str(orjson.loads(body)["args"][0]): (props, body) for props, body in got}


def assert_worker_goes_on(broker, redis, names, w, tag: str) -> None:
    """The worker survived: alive, and a normal task published now runs and is acked."""
    q = names["main"]
    broker.publish(q, q, task_body("h_record", tag))
    wait_for(lambda: alive(w) and runs(redis, names).get(tag) == 1, 10, what=f"a normal task ({tag}) to run")
    wait_for(lambda: queue_counts(q) == (0, 0), 10, interval=0.2, what=f"{q} empty with nothing unacked")
    assert alive(w)


def shape(v):
    """A header value as comparable data: exact type kind and value (doubles by repr, so 0.1 != 0.100000001)."""
    if isinstance(v, bool) or v is None:
        return (type(v).__name__, v)
    if isinstance(v, int):  # pika reads 64-bit ints as its own int subclass
        return ("int", int(v))
    if isinstance(v, float):
        return ("float", repr(v))
    if isinstance(v, dict):
        return {k: shape(x) for k, x in v.items()}
    if isinstance(v, list):
        return [shape(x) for x in v]
    return (type(v).__name__, v)


def assert_history_well_formed(history) -> None:
    assert isinstance(history, list)
    for e in history:
        assert isinstance(e, dict), e
        assert shape(e["attempt"])[0] == "int" and shape(e["at"])[0] == "int", e
        assert all(type(e[k]) is str for k in ("reason", "error-type", "error-message")), e


# -- body size -----------------------------------------------------------------------

def test_body_larger_than_max_body_size_is_dead_lettered_intact(broker, redis, names, hworker):
    q = names["main"]
    w = hworker("--threads", "2", "--max-body-size", "1000")
    w.wait_ready()
    big = task_body("h_record", "big-" + "x" * 5000)
    exact_arg = "exact-" + "y" * (1000 - len(task_body("h_record", "exact-")))
    exact = task_body("h_record", exact_arg)
    assert len(exact) == 1000  # not larger than the limit: it runs
    broker.publish(q, q, big, message_id="big")
    broker.publish(q, q, exact, message_id="exact")
    [(props, body)] = dead_letters(broker, w, q, 1)
    assert body == big, "the dead letter keeps the body intact"
    assert props.message_id == "big"
    assert props.headers["x-magne-reason"] == "body too large"
    assert props.headers["x-magne-queue"] == q
    assert not any(k.startswith("big-") for k in runs(redis, names)), "a body over the limit must never run"
    wait_for(lambda: runs(redis, names).get(exact_arg) == 1, 10, what="the body of exactly --max-body-size bytes to run")
    assert_worker_goes_on(broker, redis, names, w, "after-big")


# -- magne's own headers, from a publisher -------------------------------------------------

@pytest.mark.parametrize("retries", ["9223372036854775807", -1_000_000, 1_000_001],
                         ids=["string-int64-max", "minus-a-million", "over-a-million"])
def test_bogus_x_magne_retries_counts_as_no_retries_done(broker, redis, names, hworker, retries):
    """h_fail_retried has max_retries=2: from "0 retries done" it runs exactly 3 times, then is dead-lettered."""
    q = names["main"]
    w = hworker("--threads", "2")
    w.wait_ready()
    broker.publish(q, q, task_body("h_fail_retried", "r"), message_id="r", headers={"x-magne-retries": retries})
    wait_for(lambda: alive(w) and (broker.ready(q + ".dead") >= 1 or attempts(redis, names).get("r", 0) > 3), 15,
             what="the dead letter (or a 4th run)")
    assert attempts(redis, names).get("r") == 3, f"ran {attempts(redis, names).get('r')} times, not exactly 3"
    [(props, _)] = dead_letters(broker, w, q, 1)
    h = props.headers
    assert h["x-magne-reason"] == "task raised"
    assert shape(h["x-magne-retries"]) == ("int", 2)
    assert [e["attempt"] for e in h["x-magne-history"]] == [1, 2, 3]
    assert_history_well_formed(h["x-magne-history"])
    assert_worker_goes_on(broker, redis, names, w, "after-retries")


def test_bogus_x_magne_history_entries_are_dropped_and_valid_ones_kept(broker, redis, names, hworker, pika_doubles):
    q = names["main"]
    w = hworker("--threads", "2")
    w.wait_ready()
    valid = {"attempt": 1, "reason": "task raised", "error-type": "ValueError", "error-message": "earlier", "at": 1700000000}
    history = [
        valid,
        {"attempt": 2, "reason": "task raised", "error-type": "E", "error-message": "m", "at": 1e300},  # a double
        {"attempt": 1.5, "reason": "task raised", "error-type": "E", "error-message": "m", "at": 1700000001},
        {"attempt": 3, "reason": 7, "error-type": "E", "error-message": "m", "at": 1700000002},
        {"attempt": 4, "reason": "task raised", "error-type": "E", "error-message": "m" * 60_000, "at": 1700000003},
        "not a table",
        [1, 2, 3],
    ]
    broker.publish(q, q, task_body("h_fail", "hist"), message_id="hist", headers={"x-magne-history": history})
    [(props, body)] = dead_letters(broker, w, q, 1)
    h = props.headers
    assert h["x-magne-reason"] == "task raised"
    got = h["x-magne-history"]
    assert_history_well_formed(got)
    assert len(got) == 2, ("expected the valid entry and this attempt, got (attempt, len(error-message)): "
                           f"{[(e['attempt'], len(e['error-message'])) for e in got]}")
    assert shape(got[0]) == shape(valid)
    assert got[1]["reason"] == "task raised" and got[1]["error-type"] == "ValueError"
    assert attempts(redis, names) == {"hist": 1}
    assert_worker_goes_on(broker, redis, names, w, "after-history")


# -- dead letters keep what the publisher sent -----------------------------------------------

@pytest.mark.parametrize("double", [0.1, 1e300], ids=["double-0.1", "double-1e300"])
def test_dead_letter_keeps_properties_and_headers_bit_exact(broker, redis, names, hworker, pika_doubles, double):
    q = names["main"]
    w = hworker("--threads", "2")
    w.wait_ready()
    headers = {
        "d": double, "neg-d": -2.5e-310, "list": [1, "x", double, None], "nested": {"f": double, "s": "t"},
        "i": 7, "big": 2**40, "neg": -(2**62), "s": "text", "t": True, "none": None,
        "dec": decimal.Decimal("1.5"), "when": datetime.datetime(2020, 1, 2, 3, 4, 5, tzinfo=datetime.UTC),
        "bytes": b"\x00\xff",
    }
    props_in = dict(message_id="exact", correlation_id="corr-1", content_type="application/json",
                    app_id="hostile-app", type="hostile-type", timestamp=1700000000, priority=7)
    body = task_body("h_fail", "exact")
    broker.publish(q, q, body, headers=headers, **props_in)
    [(props, dl_body)] = dead_letters(broker, w, q, 1)
    assert dl_body == body
    got = props.headers
    assert got["x-magne-reason"] == "task raised"
    for k, v in headers.items():
        assert k in got, f"header {k!r} was dropped from the dead letter"
        assert shape(got[k]) == shape(v), f"header {k!r}: sent {v!r}, dead letter has {got[k]!r}"
    for k in props_in:
        assert getattr(props, k) == props_in[k], f"property {k}: sent {props_in[k]!r}, got {getattr(props, k)!r}"
    assert props.delivery_mode == 2
    assert_worker_goes_on(broker, redis, names, w, "after-exact")


def test_dead_letter_too_big_for_frame_max_is_still_delivered(broker, redis, names, hworker):
    """The original carries ~130 KB of headers (under the broker's frame_max of 128 KiB, so the broker takes
    it); the dead letter adds an error, a traceback and a history on top, which would not fit."""
    q = names["main"]
    frame_max = int(re.search(r"\d+", rabbitmqctl("eval", "application:get_env(rabbit, frame_max).")).group())
    w = hworker("--threads", "2")
    w.wait_ready()
    body = task_body("h_fail", "huge-headers", 3000)
    blob = "b" * (frame_max - 1200)
    broker.publish(q, q, body, message_id="huge-headers", headers={"blob": blob, "keep": "small"})
    [(props, dl_body)] = dead_letters(broker, w, q, 1, timeout=10)
    assert dl_body == body
    h = props.headers
    assert h["x-magne-reason"] == "task raised" and h["x-magne-error-type"] == "ValueError"
    # Later failures are dead-lettered promptly: nothing is stuck behind the big one.
    for i in range(3):
        broker.publish(q, q, task_body("h_fail", f"later-{i}"))
    later = dead_letters(broker, w, q, 3, timeout=5)
    assert {orjson.loads(b)["args"][0] for _, b in later} == {"later-0", "later-1", "later-2"}
    wait_for(lambda: queue_counts(q) == (0, 0), 10, interval=0.2, what="every original acked")
    assert_worker_goes_on(broker, redis, names, w, "after-huge")
    if h.get("blob") != blob:  # the publisher's header had to go: the dead letter says which
        assert "blob" in str(h.get("x-magne-dropped-headers")), \
            f"x-magne-dropped-headers must name the dropped header 'blob': {h.get('x-magne-dropped-headers')!r}"


def test_dead_letter_queue_deleted_under_the_worker_loses_nothing(broker, redis, names, hworker):
    q = names["main"]
    dq = q + ".dead"
    w = hworker("--threads", "2")
    w.wait_ready()
    broker.publish(q, q, task_body("h_fail", "first"))
    dead_letters(broker, w, q, 1)
    broker.ch.queue_delete(dq)
    assert not queue_exists(dq)
    broker.publish(q, q, task_body("h_fail", "second"), message_id="second")
    wait_for(lambda: alive(w) and attempts(redis, names).get("second") == 1, 10, what="the failing task to run")
    # Its copy may not vanish: it must end up in a re-declared <queue>.dead.
    wait_for(lambda: alive(w) and queue_exists(dq) and queue_counts(dq)[0] == 1, 10, interval=0.2,
             what=f"{dq} re-declared, with the second dead letter in it")
    [(props, body)] = broker.get_all(dq)
    assert orjson.loads(body)["args"] == ["second"] and props.headers["x-magne-reason"] == "task raised"
    wait_for(lambda: queue_counts(q) == (0, 0), 10, interval=0.2, what="the original acked")
    assert_worker_goes_on(broker, redis, names, w, "after-delete")


# -- task code that raises BaseException -------------------------------------------------------

BASE_KINDS = ["sys.exit", "SystemExit(3)", "KeyboardInterrupt", "GeneratorExit", "sys.exit", "KeyboardInterrupt"]
BASE_TYPES = {"sys.exit": "SystemExit", "SystemExit(3)": "SystemExit", "KeyboardInterrupt": "KeyboardInterrupt",
              "GeneratorExit": "GeneratorExit"}


def test_task_raising_base_exception_is_a_task_failure_and_the_pool_keeps_its_threads(broker, redis, names,
                                                                                        hworker):
    q = names["main"]
    w = hworker("--threads", "2")
    w.wait_ready()
    for i, kind in enumerate(BASE_KINDS):
        broker.publish(q, q, task_body("h_raise_base", i, kind))
    for i in range(4):
        broker.publish(q, q, task_body("h_record", f"normal-{i}"))
    # With 2 threads, the normal tasks can only run if no thread was lost to the 6 BaseExceptions.
    wait_for(lambda: alive(w) and all(runs(redis, names).get(f"normal-{i}") == 1 for i in range(4)), 10,
             what="the normal tasks after six BaseExceptions on two threads")
    got = by_first_arg(dead_letters(broker, w, q, len(BASE_KINDS), timeout=10))
    for i, kind in enumerate(BASE_KINDS):
        h = got[str(i)][0].headers
        assert h["x-magne-reason"] == "task raised", kind
        assert h["x-magne-error-type"] == BASE_TYPES[kind], kind
        assert h["x-magne-task"] == "h_raise_base"
    assert started(redis, names) == {str(i): 1 for i in range(len(BASE_KINDS))}
    assert_worker_goes_on(broker, redis, names, w, "after-base")


def test_warm_stop_after_base_exceptions_is_quick(broker, redis, names, hworker):
    q = names["main"]
    w = hworker("--threads", "2", "--shutdown-timeout", "20")
    w.wait_ready()
    for i, kind in enumerate(BASE_KINDS):
        broker.publish(q, q, task_body("h_raise_base", i, kind))
    wait_for(lambda: alive(w) and len(started(redis, names)) >= 2, 10, what="the tasks to start")
    t0 = time.monotonic()
    w.signal(signal.SIGTERM)
    code = w.wait(8)
    assert code == 0, w.log()[-3000:]
    assert time.monotonic() - t0 < 8


# -- time limits against task code inside logging ---------------------------------------------

def test_time_limits_in_a_task_logging_flat_out_leave_the_worker_working(broker, redis, names, hworker):
    """An async exception landing between a logging handler's acquire() and its try: leaves the
    handler's lock held; the worker's own threads must never block on it."""
    q = names["main"]
    n = 300
    w = hworker("--threads", "8", "--prefetch", "16", url=URL.split("?")[0] + "?heartbeat=2")
    w.wait_ready()
    try:
        for i in range(n):
            broker.publish(q, q, task_body("h_log_spin", i))
        # Fail fast on a stall (a worker stuck on the lock never decides another message).
        deadline = time.monotonic() + 25
        last, last_change = -1, time.monotonic()
        while (done := broker.ready(q + ".dead")) < n:
            alive(w)
            now = time.monotonic()
            if done != last:
                last, last_change = done, now
            assert now - last_change < 8, f"no message decided for 8 s: stuck at {done} of {n} dead-lettered"
            assert now < deadline, f"only {done} of {n} decided in 25 s"
            time.sleep(0.2)
        got = broker.get_all(q + ".dead")
        assert len(got) == n
        assert {p.headers["x-magne-reason"] for p, _ in got} == {"time limit"}
        wait_for(lambda: queue_counts(q) == (0, 0), 10, interval=0.2, what=f"{q} empty with nothing unacked")
        assert_worker_goes_on(broker, redis, names, w, "after-spin")
        t0 = time.monotonic()
        w.signal(signal.SIGTERM)
        assert w.wait(5) == 0
        assert time.monotonic() - t0 < 5
        log = w.log()
        assert "connection lost" not in log and "missed heartbeats" not in log
    except BaseException:
        w.proc.kill()  # a stuck worker logs flat out: do not let it fill the disk during teardown
        raise


# -- a basic.cancel for one queue ----------------------------------------------------------------

def test_queue_deleted_under_the_worker_does_not_drop_the_connection(broker, redis, names, hworker):
    prefix = names["MAGNE_TEST_PREFIX"]
    qa, qb = f"{prefix}.qa", f"{prefix}.qb"
    w = hworker("--threads", "4")
    w.wait_ready()
    conns_before = worker_connections(w.pid)
    assert conns_before
    for i in range(2):
        broker.publish(qb, qb, task_body("h_b", f"b-{i}", 2))
    wait_for(lambda: len(started(redis, names)) == 2, 10, what="the B tasks to start")
    broker.ch.queue_delete(qa)  # the broker sends basic.cancel for the worker's consumer of A
    broker.ch.queue_declare(qa, durable=True)  # re-declared (by whoever comes first: the worker or us)
    broker.ch.queue_bind(qa, qa, qa)
    wait_for(lambda: alive(w) and runs(redis, names).get("b-0", 0) >= 1 and runs(redis, names).get("b-1", 0) >= 1
             and queue_counts(qb) == (0, 0), 15, interval=0.2, what="the B tasks to finish and be acked")
    assert started(redis, names) == {"b-0": 1, "b-1": 1}, "a running B task ran again"
    assert runs(redis, names) == {"b-0": 1, "b-1": 1}
    broker.publish(qa, qa, task_body("h_a", "a-after"))
    wait_for(lambda: alive(w) and runs(redis, names).get("a-after") == 1, 10, what="A to be consumed again")
    wait_for(lambda: queue_counts(qa) == (0, 0), 10, interval=0.2, what=f"{qa} empty")
    assert conns_before <= worker_connections(w.pid), "the worker's connection was dropped"
    assert "connection lost" not in w.log()
    assert_worker_goes_on(broker, redis, names, w, "after-cancel")


def worker_connections(pid: int) -> set[str]:
    """The broker's ids of the consuming connections a worker process holds (a reconnect makes a new id)."""
    out = set()
    for ln in rabbitmqctl("list_connections", "pid", "client_properties").splitlines():
        name = re.search(r'"connection_name","([^"]*)"', ln)
        if name and f"pid={pid}" in name.group(1) and "publisher" not in name.group(1):
            out.add(ln.split("\t")[0])
    return out


# -- JSON integers beyond 64 bits -------------------------------------------------------------------

def test_integers_beyond_64_bits_from_another_client_arrive_exact(broker, redis, names, hworker):
    q = names["main"]
    w = hworker("--threads", "2")
    w.wait_ready()
    body = b'{"func": "h_repr", "args": [18446744073709551616, -18446744073709551617]}'
    broker.publish(q, q, body)
    wait_for(lambda: alive(w) and (len(runs(redis, names)) >= 2 or broker.ready(q + ".dead") >= 1), 10,
             what="the task to run (or be dead-lettered)")
    assert broker.ready(q + ".dead") == 0, broker.get_all(q + ".dead")[0][0].headers
    assert runs(redis, names) == {"18446744073709551616": 1, "-18446744073709551617": 1}


def _noop(*_args):
    pass


def handle(name: str, queue: str):
    """A sending handle for a task the worker has (the worker's module defines the real function)."""
    return magne.task(name=name, queue=queue)(_noop)


def test_task_send_of_integers_beyond_64_bits_arrives_exact(broker, redis, names, hworker, monkeypatch):
    from magne import configure

    monkeypatch.setenv("MAGNE_URL", URL)
    pub = configure()
    try:
        handle("h_repr", names["main"]).send(2**64, -(2**64) - 1)
    finally:
        pub.close()
    w = hworker("--threads", "2")
    w.wait_ready()
    wait_for(lambda: alive(w) and len(runs(redis, names)) >= 2, 10, what="the task to run")
    assert runs(redis, names) == {"18446744073709551616": 1, "-18446744073709551617": 1}


# -- content encoding ---------------------------------------------------------------------------------

def test_content_encoding_gzip_is_a_bad_message(broker, redis, names, hworker):
    q = names["main"]
    w = hworker("--threads", "2")
    w.wait_ready()
    plain = task_body("h_record", "labelled-gzip")
    broker.publish(q, q, gzip.compress(task_body("h_record", "gzipped")), message_id="gzipped", content_encoding="gzip")
    broker.publish(q, q, plain, message_id="labelled", content_encoding="gzip")
    wait_for(lambda: alive(w) and (broker.ready(q + ".dead") >= 2 or runs(redis, names)), 10,
             what="both to be dead-lettered (or one to run)")
    assert runs(redis, names) == {}, "a message with a content-encoding magne does not decode must not run"
    got = {p.message_id: (p, b) for p, b in dead_letters(broker, w, q, 2)}
    assert set(got) == {"gzipped", "labelled"}
    for mid, (props, _) in got.items():
        h = props.headers
        assert h["x-magne-reason"] == "bad message", mid
        assert "content-encoding" in h["x-magne-error-message"].lower().replace("_", "-"), \
            f"{mid}: {h['x-magne-error-message']!r}"
        assert props.content_encoding == "gzip"
    assert got["labelled"][1] == plain
    assert_worker_goes_on(broker, redis, names, w, "after-gzip")


# -- the application publisher under a memory alarm -------------------------------------------------

class Sender(threading.Thread):
    """Runs one send in a thread and records how it ended."""

    def __init__(self, fn) -> None:
        super().__init__(daemon=True)
        self.fn = fn
        self.result = None
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            self.result = self.fn()
        except BaseException as exc:  # the KeyboardInterrupt the test raises in this thread
            self.error = exc


def interrupt(t: threading.Thread) -> None:
    n = ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(t.ident), ctypes.py_object(KeyboardInterrupt))
    assert n == 1


def watermark_before() -> str:
    before = rabbitmqctl("eval", "vm_memory_monitor:get_vm_memory_high_watermark().").strip()
    assert re.fullmatch(r"[0-9.]+", before), f"restore needs a relative watermark, broker has {before}"
    return before


def memory_alarm_on() -> bool:
    return "memory" in rabbitmqctl("eval", "rabbit_alarm:get_alarms().")


def message_ids(broker, queue: str) -> set[str]:
    return {p.message_id for p, _ in broker.get_all(queue)}


def lift_alarm(before: str, pub, *threads) -> None:
    """Restore the watermark, then let the blocked sends finish and close the publisher (best effort)."""
    rabbitmqctl("set_vm_memory_high_watermark", before)
    wait_for(lambda: not memory_alarm_on(), 30, interval=0.2, what="the alarm to clear")
    for t in threads:
        if t is not None:
            t.join(15)
    if not any(t is not None and t.is_alive() for t in threads):
        pub.close()


@pytest.mark.reconfigures
def test_send_interrupted_in_a_memory_alarm_does_not_let_the_next_send_return_early(broker, names, monkeypatch):
    from magne import configure

    q = names["main"]
    monkeypatch.setenv("MAGNE_URL", URL)
    pub = configure()
    h = handle("h_record", q)
    h.send("warm-up")  # connection open and queue declared before the alarm
    before = watermark_before()
    first = second = None
    try:
        rabbitmqctl("set_vm_memory_high_watermark", "0.0000001")
        wait_for(memory_alarm_on, 30, interval=0.2, what="the memory alarm")
        first = Sender(lambda: h.send("first"))
        first.start()
        first.join(1.0)
        assert first.is_alive(), f"send() returned during a memory alarm: {first.result!r} {first.error!r}"
        interrupt(first)  # while it waits for its confirm
        first.join(3.0)
        assert not first.is_alive(), "send() waiting for its confirm was not interrupted within 3 s"
        assert isinstance(first.error, KeyboardInterrupt), repr(first.error)
        second = Sender(lambda: h.send("second"))
        second.start()
        second.join(1.0)
        assert second.is_alive(), (f"the next send() returned during the alarm (on the previous message's confirm?): "
                                   f"{second.result!r} {second.error!r}")
    finally:
        lift_alarm(before, pub, first, second)
    assert not second.is_alive(), "the second send() did not return after the alarm"
    assert second.error is None, repr(second.error)
    assert second.result in message_ids(broker, q), "send() returned but its message is not in the queue"


@pytest.mark.reconfigures
def test_send_waiting_behind_a_blocked_send_can_be_interrupted(broker, names, monkeypatch):
    from magne import configure

    q = names["main"]
    monkeypatch.setenv("MAGNE_URL", URL)
    pub = configure()
    h = handle("h_record", q)
    h.send("warm-up")
    before = watermark_before()
    first = behind = None
    try:
        rabbitmqctl("set_vm_memory_high_watermark", "0.0000001")
        wait_for(memory_alarm_on, 30, interval=0.2, what="the memory alarm")
        first = Sender(lambda: h.send("first"))
        first.start()
        first.join(1.0)
        assert first.is_alive(), f"send() returned during a memory alarm: {first.result!r} {first.error!r}"
        behind = Sender(lambda: h.send("behind"))
        behind.start()
        behind.join(0.5)
        assert behind.is_alive(), f"{behind.result!r} {behind.error!r}"
        interrupt(behind)
        behind.join(2.0)
        assert not behind.is_alive(), "a send() waiting behind a blocked one was not interrupted within 2 s"
        assert isinstance(behind.error, KeyboardInterrupt), repr(behind.error)
    finally:
        lift_alarm(before, pub, first, behind)
    assert not first.is_alive() and first.error is None, repr(first.error)
    assert first.result in message_ids(broker, q)


@pytest.mark.reconfigures
def test_send_after_an_interrupted_send_waits_for_its_own_confirm(broker, names, monkeypatch):
    """The stale-confirm case made visible: the second send goes to a full reject-publish queue, so the broker
    refuses it (basic.nack). A publisher that takes the interrupted send's confirm for its own reports success.
    (On the code before the fix this fails only sometimes: the interrupt there lands when the broker's first bytes
    after the alarm arrive, and those bytes are dropped; the stale ack survives only when it comes in a later read.)"""
    from magne import configure
    from magne.publisher import Publisher

    q = names["main"]
    full = f"{names['MAGNE_TEST_PREFIX']}.full"
    broker.track(full)
    broker.ch.queue_declare(full, durable=True, arguments={"x-max-length": 1, "x-overflow": "reject-publish"})
    broker.publish("", full, b"filler")
    monkeypatch.setenv("MAGNE_URL", URL)
    pub = configure()
    assert isinstance(pub, Publisher)
    h = handle("h_record", q)
    h.send("warm-up")
    before = watermark_before()
    first = second = None

    def send_to_full() -> str:
        mid = uuid.uuid4().hex
        body = orjson.dumps({"func": "h_record", "args": ["refused"], "id": mid})
        props = commands.Basic.Properties(content_type="application/json", delivery_mode=2, message_id=mid)
        pub.publish(full, body, props, exchange="")  # the default exchange: no declare of the full queue
        return mid

    try:
        rabbitmqctl("set_vm_memory_high_watermark", "0.0000001")
        wait_for(memory_alarm_on, 30, interval=0.2, what="the memory alarm")
        first = Sender(lambda: h.send("first"))
        first.start()
        first.join(1.0)
        assert first.is_alive(), f"send() returned during a memory alarm: {first.result!r} {first.error!r}"
        interrupt(first)
        second = Sender(send_to_full)
        second.start()
        second.join(1.0)
        assert second.is_alive(), f"a send() returned during the alarm: {second.result!r} {second.error!r}"
    finally:
        lift_alarm(before, pub, first, second)
    assert isinstance(first.error, KeyboardInterrupt), repr(first.error)
    assert not second.is_alive()
    assert second.result is None and isinstance(second.error, Exception), (
        f"the broker refused the second message (full reject-publish queue), yet send() returned {second.result!r}: "
        f"it took the interrupted send's confirm for its own")
    assert broker.ready(full) == 1

