"""One worker process as the supervisor sees it: how it is started, what it said on its pipe, how it is stopped.

A child starts with its stop and status signals blocked (SIGTERM, SIGINT, SIGQUIT,
SIGHUP, SIGUSR1): the mask survives exec, and magne.signals.Signals unblocks them once
the worker's handlers are installed, before it imports the task modules
(magne.worker.worker_signals). Between exec and that moment (the interpreter starting,
magne importing: some hundred ms) a signal waits instead of killing the child with the
default action, so a stop sent right after a (re)spawn is a warm stop too. A child
hung at import only notes a SIGTERM (its main loop never runs): the supervisor kills
it at its readiness timeout (`kill_hung`).
"""

from __future__ import annotations

import ctypes
import os
import signal
import subprocess
import time

PR_SET_PDEATHSIG = 1
# Signals held back in a new child until its handlers are installed (magne.signals.Signals unblocks them).
HELD_AT_START = (signal.SIGTERM, signal.SIGINT, signal.SIGQUIT, signal.SIGHUP, signal.SIGUSR1)

try:  # looked up here, not in the child: between fork and exec only async-signal-safe work is safe
    _prctl = ctypes.CDLL(None, use_errno=True).prctl
except (OSError, AttributeError):  # not Linux: children outlive a killed supervisor
    _prctl = None


def _child_setup() -> None:
    """Between fork and exec, in the child: die (warmly, SIGTERM) with the supervisor, and hold the stop signals
    until the worker can handle them."""
    if _prctl is not None:
        _prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    signal.pthread_sigmask(signal.SIG_BLOCK, HELD_AT_START)


def start(argv: list[str], env: dict[str, str], pass_fd: int) -> subprocess.Popen[bytes]:
    """Start a worker process in its own session (a terminal's Ctrl-C reaches only the supervisor). Main thread."""
    return subprocess.Popen(argv, env=env, pass_fds=(pass_fd,), start_new_session=True, preexec_fn=_child_setup)


class Child:
    """One worker process of a slot. Owned by the supervisor's main thread."""

    def __init__(self, slot: int, proc: subprocess.Popen[bytes], ready_fd: int) -> None:
        self.slot = slot
        self.proc = proc
        self.ready_fd = ready_fd
        self.started = time.monotonic()
        self.ready = False
        self.died = False  # exited without being asked to (then restarted, unless the supervisor is stopping)
        self.hung = False  # killed by the supervisor for missing its readiness timeout
        self.metrics_port = 0  # where the child serves its metrics (127.0.0.1), once it said so
        self.announced = False  # the metrics side knows this child (SupervisorMetrics.child_up)
        self._buf = b""

    @property
    def pid(self) -> int:
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc.poll() is None

    def poll_ready(self) -> bool:
        """Read what the child wrote on its pipe (main thread, never blocks): lines `m<port>`, then `r` (ready)."""
        if not self.ready and self.ready_fd >= 0:
            try:
                data = os.read(self.ready_fd, 256)
            except (BlockingIOError, OSError):
                data = b""
            if data:
                self._buf += data
                *lines, self._buf = self._buf.split(b"\n")
                for line in lines:
                    if line.startswith(b"m") and line[1:].isdigit():
                        self.metrics_port = int(line[1:])
                    elif line == b"r":
                        self.ready = True
        return self.ready

    def overdue(self, now: float, ready_timeout: float) -> bool:
        """Alive, not ready, and started more than `ready_timeout` seconds ago (0: no timeout)."""
        return bool(ready_timeout) and not self.hung and not self.poll_ready() and self.alive() and \
            now - self.started > ready_timeout

    def kill_hung(self) -> None:
        """SIGKILL a child that missed its readiness timeout: hung at import, it would only note a SIGTERM."""
        self.hung = True
        if self.alive():
            self.proc.kill()

    def stop(self, timeout: float) -> None:
        """SIGTERM, wait up to `timeout`, then SIGKILL. A child that never became ready is killed at once: it may be
        hung at import, where a SIGTERM is only noted."""
        if not self.alive():
            return
        if not self.ready:
            self.proc.kill()
            self.proc.wait()
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()

    def close(self) -> None:
        """Close the pipe; never read it again (its fd number may soon belong to another child's pipe)."""
        fd, self.ready_fd = self.ready_fd, -1
        if fd >= 0:
            try:
                os.close(fd)
            except OSError:
                pass

    def status(self, now: float) -> str:
        state = "ready" if self.ready else "starting"
        return f"process {self.slot} pid {self.pid} {state} for {now - self.started:.0f}s"


def describe_exit(code: int) -> str:
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exit code {code}"
