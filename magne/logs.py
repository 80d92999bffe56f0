"""Logging for operators, through a path that never blocks magne's own threads.

Why not plain `logging` on the I/O thread: a time limit is an exception raised into
a task's thread at any bytecode; landing between a handler's `acquire()` and its
`try:` it leaves that handler's lock held forever (issue 9 measured 64 leaked locks
in 2,000 interrupts of a task logging in a loop). Any other thread logging through
that handler then blocks: the I/O thread would stop acking and heartbeating.

So magne's own code logs through `Log`: the record is built on the calling thread
without any lock (level checked against a cached logger, `LogRecord` made by hand)
and appended to a deque; one writer thread (`magne-log`) hands records to the real
handlers. If a handler is wedged, only the writer waits; past MAX_PENDING records
new ones are dropped and counted, and a line goes straight to fd 2. The pool also
releases logging locks that an interrupted task left held (`release_leaked_locks`).

The writer starts with the first record, whoever makes it: the CLI (`setup()`), or an
application that uses magne as a library (its own logging configuration then gets magne's
records, "publishing connection failed" included). A forked child starts its own writer
on its first record and drops what the parent had not written yet (the parent writes it).

Everything that came from a message (task names, ids, error texts) goes through
`clean()` before it reaches a log line: control characters are escaped, so a
publisher cannot forge log lines with newlines. `--log-format json` writes one
object per line with stable field names (JSON_FIELDS).
"""

from __future__ import annotations

import collections
import datetime
import json
import logging
import os
import re
import sys
import threading
import time
from typing import Any

import orjson

from magne.engine.waker import Waker

TEXT_FORMAT = "%(asctime)s %(levelname)s [%(process)d %(threadName)s] %(name)s: %(message)s"
JSON_FIELDS = ("event", "task", "queue", "message_id", "outcome", "attempt", "duration_ms", "reason", "url", "counters")
MAX_PENDING = 10_000

_pending: collections.deque[logging.LogRecord] = collections.deque()
_waker = Waker()
_dropped = 0
_writer: threading.Thread | None = None
_writer_pid = 0
_idle = threading.Event()
_idle.set()

# Control characters, line and paragraph separators, and the bidirectional overrides that
# can make a line display as something else.
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f\u200e\u200f\u2028\u2029\u202a-\u202e\u2066-\u2069\ud800-\udfff]")


def clean(value: Any, limit: int = 200) -> str:
    """A publisher-controlled value made safe for one log line: control characters escaped, then cut to `limit`."""
    text = value if isinstance(value, str) else repr(value)
    text = _CONTROL.sub(lambda m: m.group().encode("unicode_escape").decode("ascii"), text[: limit * 2])
    if len(text) > limit:
        text = text[: limit - 3] + "..."
    return text


class Log:
    """A logger for magne's threads (I/O, watchdog, pool bookkeeping, supervisor): never takes a lock.

    Extra keyword arguments become fields of the record (see JSON_FIELDS).
    """

    __slots__ = ("name", "_logger")

    def __init__(self, name: str) -> None:
        self.name = name
        self._logger = logging.getLogger(name)  # at import time, on the importing thread

    def _emit(self, level: int, msg: str, args: tuple[Any, ...], exc_info: Any = None, **fields: Any) -> None:
        global _dropped
        if level < self._logger.getEffectiveLevel():  # walks parents, no lock
            return
        if len(_pending) >= MAX_PENDING:
            _dropped += 1
            if _dropped % 1000 == 1:
                _raw(f"magne: log writer is stuck; {_dropped} log records dropped so far\n")
            return
        record = logging.LogRecord(self.name, level, "", 0, msg, args, exc_info)
        if fields:
            record.__dict__.update(fields)
        _pending.append(record)
        _idle.clear()
        if _writer_pid != os.getpid():  # the first record of this process: start its writer (no lock taken)
            start_writer()
        _waker.wake()

    def debug(self, msg: str, *args: Any, **fields: Any) -> None:
        self._emit(logging.DEBUG, msg, args, **fields)

    def info(self, msg: str, *args: Any, **fields: Any) -> None:
        self._emit(logging.INFO, msg, args, **fields)

    def warning(self, msg: str, *args: Any, **fields: Any) -> None:
        self._emit(logging.WARNING, msg, args, **fields)

    def error(self, msg: str, *args: Any, **fields: Any) -> None:
        self._emit(logging.ERROR, msg, args, **fields)

    def exception(self, msg: str, *args: Any, **fields: Any) -> None:
        self._emit(logging.ERROR, msg, args, exc_info=sys.exc_info(), **fields)


def _raw(text: str) -> None:
    try:
        os.write(2, text.encode("utf-8", "replace"))
    except OSError:
        pass


def _write_loop() -> None:
    """The `magne-log` thread: the only one of magne's threads that enters logging handlers."""
    while True:
        _waker.wait(0.5)
        while _pending:
            record = _pending.popleft()
            try:
                logging.getLogger(record.name).handle(record)
            except Exception:
                pass
        _idle.set()


def start_writer() -> None:
    """Start this process's writer thread if it has none. Whichever thread logs first; two racing here at most
    start two writers, which share the deque (each record is popped once)."""
    global _writer, _writer_pid
    if _writer is None or not _writer.is_alive() or _writer_pid != os.getpid():
        _writer_pid = os.getpid()
        _writer = threading.Thread(target=_write_loop, name="magne-log", daemon=True)
        _writer.start()


def _after_fork_in_child() -> None:
    """A forked child has no writer thread: it starts one with its first record; the parent's unwritten records
    are the parent's to write."""
    global _waker, _writer
    _pending.clear()
    _waker.close()  # this process's copy of the parent's fds (the parent's stay open)
    _waker = Waker()
    _writer = None
    _idle.set()


os.register_at_fork(after_in_child=_after_fork_in_child)


def flush(timeout: float = 2.0) -> None:
    """Wait (bounded) until the writer has handed every pending record to the handlers. Main thread, at exit."""
    if _writer is None:
        return
    deadline = time.monotonic() + timeout
    while _pending and time.monotonic() < deadline:
        _idle.wait(0.05)


class JSONFormatter(logging.Formatter):
    """One JSON object per line: time, level, pid, thread, logger, message, and the stable fields present."""

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "time": datetime.datetime.fromtimestamp(record.created, datetime.UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "pid": record.process,
            "thread": record.threadName,
            "logger": record.name,
            "message": record.getMessage(),
        }
        for key in JSON_FIELDS:
            value = record.__dict__.get(key)
            if value is not None:
                out[key] = value
        if record.exc_info:
            out["traceback"] = self.formatException(record.exc_info)
        try:
            return orjson.dumps(out, default=str).decode()
        except (TypeError, orjson.JSONEncodeError):  # a lone surrogate, say: the standard library escapes it
            return json.dumps(out, default=str)


def setup(level: str = "info", fmt: str = "text") -> None:
    """Configure the root logger once per process (main thread, at start) and start the writer."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JSONFormatter() if fmt == "json" else logging.Formatter(TEXT_FORMAT))
    root = logging.getLogger()
    for h in list(root.handlers):
        root.removeHandler(h)
    root.addHandler(handler)
    root.setLevel(level.upper())
    start_writer()


def release_leaked_locks() -> int:
    """Release every logging lock the calling thread still holds; returns how many.

    Called by a pool thread right after a task was interrupted, when the thread is
    back in magne's code and so holds no logging lock legitimately: any it owns was
    left by the interrupt landing inside logging. RLocks must be released by their
    owner, which is this thread.
    """
    released = 0
    locks = [getattr(logging, "_lock", None)]
    for ref in list(getattr(logging, "_handlerList", [])):
        handler = ref()
        if handler is not None:
            locks.append(handler.lock)
    for lock in locks:
        is_owned = getattr(lock, "_is_owned", None)
        while lock is not None and is_owned is not None and is_owned():
            lock.release()
            released += 1
    return released
