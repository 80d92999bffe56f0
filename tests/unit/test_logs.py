"""magne.logs: escaping publisher values, lock-free logging from magne's threads, leaked-lock recovery, JSON lines."""

from __future__ import annotations

import io
import json
import logging
import sys
import threading
import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from magne import logs


@pytest.fixture
def root_handler():
    """logs.setup() on the root logger with its stream swapped for a StringIO; the root is restored afterwards."""
    root = logging.getLogger()
    saved_handlers, saved_level = list(root.handlers), root.level

    def install(fmt: str = "text") -> tuple[logging.Handler, io.StringIO]:
        logs.setup("info", fmt)
        handler = root.handlers[0]
        stream = io.StringIO()
        handler.setStream(stream)  # type: ignore[attr-defined]
        return handler, stream

    yield install
    logs.flush(2.0)
    for h in list(root.handlers):
        root.removeHandler(h)
    for h in saved_handlers:
        root.addHandler(h)
    root.setLevel(saved_level)


def wait_for(cond, timeout: float = 2.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return True
        time.sleep(0.005)
    return cond()


# -- clean ------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(("raw", "want"), [
    ("a\nb", "a\\nb"),
    ("a\rb", "a\\rb"),
    ("\x1b[31mred", "\\x1b[31mred"),
    ("x\u2028y\u2029z", "x\\u2028y\\u2029z"),
    ("nul\x00del\x7fnel\x85", "nul\\x00del\\x7fnel\\x85"),
    ("tab\t", "tab\\t"),
    ("plain ünïcode ✓", "plain ünïcode ✓"),
])
def test_clean_escapes_control_characters(raw, want):
    assert logs.clean(raw) == want


def test_clean_of_non_strings_is_their_repr():
    assert logs.clean(b"a\nb") == "b'a\\nb'" == repr(b"a\nb")
    assert logs.clean(None) == "None"
    assert logs.clean(["\n"]) == "['\\n']"


def test_clean_caps_length():
    out = logs.clean("x" * 10_000, 100)
    assert len(out) == 100 and out.endswith("...")
    assert logs.clean("x" * 100, 100) == "x" * 100
    assert len(logs.clean("y" * 10_000)) == 200
    # escaping happens after the cap: at most every kept character grows to a 6-character escape
    assert len(logs.clean("\u2028" * 10_000, 100)) <= 97 * 6 + 3


@settings(max_examples=300, deadline=None)
@given(text=st.text(max_size=300), limit=st.integers(10, 300))
def test_clean_never_lets_a_line_break_through(text, limit):
    out = logs.clean(text, limit)
    assert len(out.splitlines()) <= 1 and "\n" not in out and "\r" not in out
    assert not any(ord(c) < 0x20 or 0x7F <= ord(c) <= 0x9F for c in out)
    assert len(out) <= 6 * limit


# -- Log never blocks ------------------------------------------------------------------------------------------------
def test_log_returns_while_another_thread_holds_the_handler_lock(root_handler):
    handler, stream = root_handler()
    log = logs.Log("magne.test.blocking")
    held, release = threading.Event(), threading.Event()

    def holder() -> None:
        with handler.lock:
            held.set()
            release.wait(5)

    h = threading.Thread(target=holder, daemon=True)
    h.start()
    assert held.wait(2)
    try:
        done = threading.Event()
        took: list[float] = []

        def caller() -> None:
            t0 = time.monotonic()
            for i in range(50):
                log.info("while the handler is held %d", i, event="test")
            took.append(time.monotonic() - t0)
            done.set()

        c = threading.Thread(target=caller, daemon=True)
        c.start()
        assert done.wait(0.1), "Log.info blocked on the handler's lock"
        assert took[0] < 0.1
        time.sleep(0.05)
        assert "while the handler is held" not in stream.getvalue()  # the writer is the one waiting
    finally:
        release.set()
        h.join(2)
    assert wait_for(lambda: "while the handler is held 49" in stream.getvalue())
    lines = [ln for ln in stream.getvalue().splitlines() if "while the handler is held" in ln]
    assert len(lines) == 50
    assert "INFO" in lines[0] and "magne.test.blocking" in lines[0]


def test_log_respects_levels_without_a_lock(root_handler):
    _handler, stream = root_handler()
    log = logs.Log("magne.test.levels")
    log.debug("not shown")
    log.warning("shown %s", "w")
    assert wait_for(lambda: "shown w" in stream.getvalue())
    logs.flush()
    assert "not shown" not in stream.getvalue()


def test_a_wedged_handler_drops_records_past_the_limit(root_handler, monkeypatch):
    handler, stream = root_handler()
    monkeypatch.setattr(logs, "MAX_PENDING", 200)
    log = logs.Log("magne.test.wedged")
    dropped_before = logs._dropped
    with handler.lock:  # this thread wedges the handler; only the writer waits on it
        time.sleep(0.05)
        t0 = time.monotonic()
        for i in range(500):
            log.info("record %d", i)
        assert time.monotonic() - t0 < 0.5
        assert len(logs._pending) <= 200
        assert logs._dropped - dropped_before >= 299
    assert wait_for(lambda: not logs._pending)
    logs.flush()
    assert "record 0" in stream.getvalue()


# -- release_leaked_locks ------------------------------------------------------------------------------------------------
def _release_all(lock) -> None:
    while lock._is_owned():
        lock.release()


def test_release_leaked_locks_releases_a_twice_acquired_handler_lock():
    handler = logging.StreamHandler(io.StringIO())
    try:
        handler.acquire()
        handler.acquire()
        assert logs.release_leaked_locks() == 2
        assert not handler.lock._is_owned()
        got = []
        t = threading.Thread(target=lambda: got.append(handler.lock.acquire(timeout=1)))
        t.start()
        t.join(2)
        assert got == [True]  # another thread can take it now
    finally:
        _release_all(handler.lock)
        handler.close()


def test_release_leaked_locks_covers_the_module_lock_and_leaves_other_threads_locks():
    handler = logging.StreamHandler(io.StringIO())
    other_has_it, done = threading.Event(), threading.Event()

    def other() -> None:
        with handler.lock:
            other_has_it.set()
            done.wait(5)

    t = threading.Thread(target=other, daemon=True)
    t.start()
    assert other_has_it.wait(2)
    try:
        logging._lock.acquire()
        assert logs.release_leaked_locks() == 1  # logging's own lock, not the other thread's handler lock
        assert not logging._lock._is_owned()
        assert logs.release_leaked_locks() == 0
    finally:
        _release_all(logging._lock)
        done.set()
        t.join(2)
        handler.close()


# -- JSON lines -------------------------------------------------------------------------------------------------------------
def test_json_formatter_fields():
    fmt = logs.JSONFormatter()
    rec = logging.LogRecord("magne.io", logging.WARNING, "", 0, "message %s\nwith a newline", ("x",), None)
    rec.__dict__.update(event="retry", task="t", queue="q", attempt=2, duration_ms=1.5, counters={"acked": 3},
                        url=object(), not_a_field="ignored")
    line = fmt.format(rec)
    assert "\n" not in line
    out = json.loads(line)
    assert set(out) == {"time", "level", "pid", "thread", "logger", "message", "event", "task", "queue", "attempt",
                        "duration_ms", "counters", "url"}
    assert out["level"] == "warning" and out["logger"] == "magne.io" and out["message"] == "message x\nwith a newline"
    assert out["event"] == "retry" and out["attempt"] == 2 and out["counters"] == {"acked": 3}
    assert out["time"].endswith("+00:00") and "T" in out["time"]
    assert isinstance(out["url"], str)
    assert set(out) - {"time", "level", "pid", "thread", "logger", "message"} <= set(logs.JSON_FIELDS)


def test_json_formatter_traceback():
    try:
        raise ValueError("bad")
    except ValueError:
        rec = logging.LogRecord("magne", logging.ERROR, "", 0, "failed", (), sys.exc_info())
    out = json.loads(logs.JSONFormatter().format(rec))
    assert "ValueError: bad" in out["traceback"]


def test_json_lines_through_the_writer(root_handler):
    _handler, stream = root_handler("json")
    logs.Log("magne.test.json").info("hello %s", "world", event="ready", queue="q1")
    assert wait_for(lambda: "hello world" in stream.getvalue())
    (line,) = [ln for ln in stream.getvalue().splitlines() if "hello world" in ln]
    out = json.loads(line)
    assert out["message"] == "hello world" and out["event"] == "ready" and out["queue"] == "q1"
    assert out["thread"] != "magne-log"  # the record names the thread that logged, not the writer
