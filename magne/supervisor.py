"""The supervisor: `magne worker --processes P` runs P worker processes and keeps them running.

It holds no AMQP connection; each child is a full worker (one connection, one
channel, one I/O thread, its pool). Children are started as `python -m magne
worker ...` with the URL in the environment (never in argv, where `ps` shows it),
in their own session so a terminal's Ctrl-C reaches only the supervisor, and with
PR_SET_PDEATHSIG so they stop warmly if the supervisor is killed.

Signals: SIGTERM or a first SIGINT → warm stop of every child; a second SIGINT →
cold (SIGQUIT to the children); SIGHUP → reload: start P children with freshly
imported code, and once all of them report ready stop the old ones warmly. For
that moment both generations consume (2P connections); a reload whose new code
fails to start leaves the old children running.
"""

from __future__ import annotations

import ctypes
import logging
import os
import signal
import subprocess
import sys
import time
from types import FrameType

from magne.worker import EXIT_CONFIG, EXIT_FAILED, EXIT_OK, Options

log = logging.getLogger("magne.supervisor")

PR_SET_PDEATHSIG = 1
QUICK_DEATH = 10.0  # a child that dies sooner than this after its start counts towards a crash loop
MAX_BACKOFF = 60.0


def _die_with_parent() -> None:
    try:
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    except (OSError, AttributeError):  # not Linux: children outlive a killed supervisor
        pass


class Child:
    def __init__(self, slot: int, proc: subprocess.Popen[bytes], ready_fd: int) -> None:
        self.slot = slot
        self.proc = proc
        self.ready_fd = ready_fd
        self.started = time.monotonic()
        self.ready = False

    def poll_ready(self) -> bool:
        if not self.ready:
            try:
                if os.read(self.ready_fd, 16):
                    self.ready = True
            except BlockingIOError:
                pass
        return self.ready

    def close(self) -> None:
        try:
            os.close(self.ready_fd)
        except OSError:
            pass


def describe_exit(code: int) -> str:
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exit code {code}"


class Supervisor:
    def __init__(self, opts: Options, processes: int, log_level: str = "info", pid_file: str | None = None) -> None:
        self.opts = opts
        self.processes = processes
        self.log_level = log_level
        self.pid_file = pid_file
        self.children: dict[int, Child] = {}  # slot -> current child
        self.old: list[Child] = []  # children of the previous generation, stopping after a reload
        self.pending: dict[int, Child] = {}  # slot -> new child of a reload, not ready yet
        self.crashes: dict[int, int] = {}
        self.restart_at: dict[int, float] = {}
        self._stops = 0
        self._cold = False
        self._reload = False

    def child_argv(self) -> list[str]:
        o = self.opts
        argv = [sys.executable, "-m", "magne", "--log-level", self.log_level, "worker", *o.modules,
                "--threads", str(o.threads), "--shutdown-timeout", str(o.shutdown_timeout),
                "--time-limit", str(o.time_limit), "--lost-after", str(o.lost_after),
                "--queue-type", o.queue_type, "--max-retries", str(o.max_retries),
                "--min-backoff", str(o.min_backoff), "--max-backoff", str(o.max_backoff)]
        if o.prefetch is not None:
            argv += ["--prefetch", str(o.prefetch)]
        if o.queues:
            argv += ["--queues", *o.queues]
        return argv

    def spawn(self, slot: int) -> Child:
        r, w = os.pipe()
        os.set_blocking(r, False)
        env = dict(os.environ, MAGNE_READY_FD=str(w), MAGNE_PROCESS_SLOT=str(slot))
        if self.opts.url:
            env["MAGNE_URL"] = self.opts.url
        proc = subprocess.Popen(self.child_argv(), env=env, pass_fds=(w,), start_new_session=True,
                                preexec_fn=_die_with_parent)
        os.close(w)
        log.info("started worker process %d (pid %d)", slot, proc.pid)
        return Child(slot, proc, r)

    # -- signals ------------------------------------------------------------------
    def _on_signal(self, signum: int, _frame: FrameType | None) -> None:
        if signum == signal.SIGHUP:
            self._reload = True
        elif signum == signal.SIGQUIT or (signum == signal.SIGINT and self._stops >= 1):
            self._cold = True
            self._stops += 1
        else:
            self._stops += 1

    def install_signals(self) -> None:
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGQUIT, signal.SIGHUP):
            signal.signal(sig, self._on_signal)

    def _signal_all(self, sig: int) -> None:
        for c in [*self.children.values(), *self.old, *self.pending.values()]:
            if c.proc.poll() is None:
                c.proc.send_signal(sig)

    # -- the loop -----------------------------------------------------------------
    def run(self) -> int:
        if self.pid_file:
            with open(self.pid_file, "w") as f:
                f.write(f"{os.getpid()}\n")
        try:
            return self._run()
        finally:
            if self.pid_file:
                try:
                    os.unlink(self.pid_file)
                except OSError:
                    pass

    def _run(self) -> int:
        log.info("supervisor starting %d worker processes of %d threads each (one connection each)",
                 self.processes, self.opts.threads)
        for slot in range(1, self.processes + 1):
            self.children[slot] = self.spawn(slot)
        stopping = cold_sent = False
        fatal = 0
        while True:
            if self._stops and not stopping:
                stopping = True
                log.info("warm shutdown of %d worker processes (signal again for cold)", len(self.children))
                self._signal_all(signal.SIGTERM)
            if self._cold and not cold_sent:
                cold_sent = True
                log.warning("cold shutdown: telling every worker process to stop now")
                self._signal_all(signal.SIGQUIT)
            if self._reload and not stopping:
                self._reload = False
                self._start_reload()
            fatal = self._reap(stopping) or fatal
            if fatal and not stopping:
                stopping = True
                self._signal_all(signal.SIGTERM)
            self._advance_reload()
            if stopping and not self._alive():
                break
            if not stopping:
                self._restart_due()
            time.sleep(0.1)
        codes = [c.proc.returncode for c in [*self.children.values(), *self.old]]
        log.info("supervisor stopped; worker exit codes %s", codes)
        if fatal:
            return fatal
        return EXIT_OK if all(c == 0 for c in codes) else EXIT_FAILED

    def _alive(self) -> bool:
        return any(c.proc.poll() is None for c in [*self.children.values(), *self.old, *self.pending.values()])

    def _reap(self, stopping: bool) -> int:
        """Notice dead children; schedule restarts. Returns an exit code if the worker cannot run at all."""
        for c in list(self.old):
            if c.proc.poll() is not None:
                log.info("old worker process %d (pid %d) stopped after reload: %s",
                         c.slot, c.proc.pid, describe_exit(c.proc.returncode))
                self.old.remove(c)
                c.close()
        for slot, c in list(self.pending.items()):
            code = c.proc.poll()
            if code is not None:
                log.error("reload failed: new worker process %d (pid %d) did not start (%s); "
                          "keeping the running workers on the old code", slot, c.proc.pid, describe_exit(code))
                for other in self.pending.values():
                    if other.proc.poll() is None:
                        other.proc.send_signal(signal.SIGTERM)
                        other.proc.wait()
                    other.close()
                self.pending.clear()
                break
        for slot, c in self.children.items():
            code = c.proc.poll()
            if code is None or slot in self.restart_at or stopping:
                continue
            if code == EXIT_CONFIG and not c.ready:
                log.error("worker process %d (pid %d) cannot start: configuration error (see its log above); "
                          "the supervisor stops instead of restarting it", slot, c.proc.pid)
                return EXIT_CONFIG
            lived = time.monotonic() - c.started
            self.crashes[slot] = self.crashes.get(slot, 0) + 1 if lived < QUICK_DEATH else 0
            delay = min(MAX_BACKOFF, 0.5 * 2 ** self.crashes[slot]) if self.crashes[slot] else 0.5
            why = f"crash loop: died {self.crashes[slot]} times in a row within {QUICK_DEATH:g}s of starting; " \
                if self.crashes[slot] >= 2 else ""
            log.error("worker process %d (pid %d) died (%s) after %.1fs; %srestarting it in %.1fs",
                      slot, c.proc.pid, describe_exit(code), lived, why, delay)
            c.close()
            self.restart_at[slot] = time.monotonic() + delay
        return 0

    def _restart_due(self) -> None:
        now = time.monotonic()
        for slot, when in list(self.restart_at.items()):
            if now >= when:
                del self.restart_at[slot]
                self.children[slot] = self.spawn(slot)

    def _start_reload(self) -> None:
        if self.pending:
            log.warning("reload already in progress; ignoring SIGHUP")
            return
        log.info("reload: starting %d worker processes with freshly imported code", self.processes)
        for slot in range(1, self.processes + 1):
            self.pending[slot] = self.spawn(slot)

    def _advance_reload(self) -> None:
        if not self.pending or not all(c.poll_ready() for c in self.pending.values()):
            return
        log.info("reload: new worker processes are ready; stopping the old ones warmly")
        for slot, new in self.pending.items():
            old = self.children.get(slot)
            if old is not None and old.proc.poll() is None:
                old.proc.send_signal(signal.SIGTERM)
                self.old.append(old)
            self.restart_at.pop(slot, None)
            self.crashes[slot] = 0
            self.children[slot] = new
        self.pending.clear()
