"""The supervisor: `magne worker --processes P` runs P worker processes and keeps them running.

It holds no AMQP connection; each child is a full worker (one connection, one
channel, one I/O thread, its pool). Children are started as `python -m magne
worker ...` with the URL in the environment (never in argv, where `ps` shows it),
in their own session so a terminal's Ctrl-C reaches only the supervisor, and with
PR_SET_PDEATHSIG so they stop warmly if the supervisor is killed.

Signals (magne.signals): SIGTERM or a first SIGINT → warm stop of every child; a
second SIGINT or SIGQUIT → cold (SIGQUIT to the children); SIGUSR1 → a status line
(and each ready child logs its own); SIGHUP → reload: start P children with freshly
imported code, and once all of them report ready stop the old ones warmly. For that
moment both generations consume (2P connections); a reload whose new code fails to
start, or misses the readiness timeout, leaves the old children running, and a
SIGHUP during a reload starts it over. Children hold their stop signals until their
handlers are installed (magne.children), so a stop right after a spawn is warm too.

Exit codes and permanent errors: a child that exits with the configuration exit
code at the fleet's first start (a task module that does not import, a wrong
password, an unknown vhost) stops the supervisor with that code: restarting cannot
fix it. The same error from a child whose slot was ready before (permissions
revoked, the vhost at its connection limit) is retried with backoff while its
siblings keep serving (event `child_permanent_error`). A stop the supervisor was
asked to make exits 0 unless a child failed on its own.
"""

from __future__ import annotations

import os
import shutil
import signal
import sys
import tempfile
import time
from typing import TYPE_CHECKING

from magne import children, logs
from magne.backoff import Backoff
from magne.children import Child, describe_exit
from magne.coordination import scheduler_argv
from magne.errors import EXIT_CONFIG, EXIT_FAILED, EXIT_OK
from magne.signals import Signals
from magne.worker import Options

if TYPE_CHECKING:
    from magne.metrics import SupervisorMetrics

log = logs.Log("magne.supervisor")

QUICK_DEATH = 10.0  # a child that dies sooner than this after its start counts towards a crash loop
MAX_BACKOFF = 60.0
STOP_WAIT = 10.0  # how long a failed reload waits for its other new children to stop


class Supervisor:
    def __init__(self, opts: Options, processes: int, log_level: str = "info", log_format: str = "text",
                 ready_timeout: float = 60.0) -> None:
        self.opts = opts
        self.ready_timeout = ready_timeout  # seconds a child has to report ready (0: no limit)
        self.was_ready: set[int] = set()  # slots that had a ready child: a permanent error there is retried
        self.processes = processes
        self.log_level = log_level
        self.log_format = log_format
        self.children: dict[int, Child] = {}  # slot -> current child
        self.old: list[Child] = []  # children of the previous generation, stopping after a reload
        self.pending: dict[int, Child] = {}  # slot -> new child of a reload, not ready yet
        self.backoffs: dict[int, Backoff] = {}
        self.restart_at: dict[int, float] = {}
        self.signals: Signals | None = None
        self.metrics: SupervisorMetrics | None = None
        self._announced: dict[int, Child] = {}  # pid -> child whose metrics port the metrics side knows

    def child_argv(self) -> list[str]:
        o = self.opts
        argv = [sys.executable, "-m", "magne", "--log-level", self.log_level, "--log-format", self.log_format,
                "worker", *o.modules, "--threads", str(o.threads), "--shutdown-timeout", str(o.shutdown_timeout),
                "--time-limit", str(o.time_limit), "--lost-after", str(o.lost_after),
                "--queue-type", o.queue_type, "--max-retries", str(o.max_retries),
                "--min-backoff", str(o.min_backoff), "--max-backoff", str(o.max_backoff),
                "--async-concurrency", str(o.async_concurrency), "--event-loop", o.event_loop]
        if o.prefetch is not None:
            argv += ["--prefetch", str(o.prefetch)]
        if o.queues:
            argv += ["--queues", *o.queues]
        if o.max_body_size:
            argv += ["--max-body-size", str(o.max_body_size)]
        argv += scheduler_argv(o)
        for fmt in o.accept or ():
            argv += ["--accept", fmt]
        if o.dramatiq_queues:
            argv += ["--dramatiq-queues", *o.dramatiq_queues]
        argv += ["--control", "on" if o.control else "off", "--events", "on" if o.events else "off"]
        if o.metrics:  # each child on an ephemeral local port; the supervisor serves the one --metrics address
            argv += ["--metrics", "127.0.0.1:0"]
        return argv

    def spawn(self, slot: int) -> Child:
        r, w = os.pipe()
        os.set_blocking(r, False)
        env = dict(os.environ, MAGNE_READY_FD=str(w), MAGNE_PROCESS_SLOT=str(slot))
        if self.metrics is not None:
            from magne.metrics import FINAL_ENV

            env[FINAL_ENV] = self.metrics.final_dir
        if self.opts.url:  # the environment, not argv: `ps` shows argv to every user
            env["MAGNE_URL"] = ",".join([self.opts.url] if isinstance(self.opts.url, str) else self.opts.url)
        proc = children.start(self.child_argv(), env, w)
        os.close(w)
        log.info("started worker process %d (pid %d)", slot, proc.pid, event="child_started")
        return Child(slot, proc, r)

    def install_signals(self) -> None:
        self.signals = Signals(signal.SIGTERM, signal.SIGINT, signal.SIGQUIT, signal.SIGHUP, signal.SIGUSR1)

    def _all(self) -> list[Child]:
        return [*self.children.values(), *self.old, *self.pending.values()]

    def _signal_all(self, sig: int) -> None:
        for c in self._all():
            if c.proc.poll() is None:
                c.proc.send_signal(sig)

    # -- the loop (main thread) ----------------------------------------------------------
    def run(self) -> int:
        if not self.opts.metrics:
            return self._run()
        from magne.metrics import SupervisorMetrics

        final_dir = tempfile.mkdtemp(prefix="magne-metrics-")
        try:
            self.metrics = SupervisorMetrics(self.opts.metrics, final_dir)
            self.metrics.start()
            log.info("serving the metrics of every worker process on %s", self.metrics.url, event="metrics_listening",
                     url=self.metrics.url)
            return self._run()
        finally:
            if self.metrics is not None:
                self.metrics.stop()
            shutil.rmtree(final_dir, ignore_errors=True)

    def _sync_metrics(self) -> None:
        """Tell the metrics side which children serve metrics where, and which went away (main thread; only puts
        events on a queue, never blocks)."""
        m = self.metrics
        if m is None:
            return
        for c in self._all():
            if c.proc.poll() is not None:
                continue
            c.poll_ready()
            if c.metrics_port and not c.announced:
                c.announced = True
                self._announced[c.proc.pid] = c
                m.child_up(c.slot, c.proc.pid, c.metrics_port)
        for pid, c in list(self._announced.items()):
            if c.proc.poll() is not None:
                del self._announced[pid]
                m.child_down(pid)

    def _run(self) -> int:
        sig = self.signals or Signals()
        log.info("supervisor starting %d worker processes of %d threads each (one connection each)",
                 self.processes, self.opts.threads, event="supervisor_start")
        for slot in range(1, self.processes + 1):
            self.children[slot] = self.spawn(slot)
        stopping = cold_sent = False
        fatal = 0
        while True:
            if sig.stops() and not stopping:
                stopping = True
                self.restart_at.clear()  # a child waiting for its restart stays down
                log.info("warm shutdown of %d worker processes (signal again for cold)", len(self.children),
                         event="warm_shutdown")
                self._signal_all(signal.SIGTERM)
            if sig.cold() and not cold_sent:
                cold_sent = True
                log.warning("cold shutdown: telling every worker process to stop now", event="cold_shutdown")
                self._signal_all(signal.SIGQUIT)
            if sig.take(signal.SIGHUP) and not stopping:
                self._start_reload()
            if sig.take(signal.SIGUSR1):
                self._log_status()
            self._check_readiness(stopping)
            fatal = self._reap(stopping) or fatal
            if fatal and not stopping:
                stopping = True
                self.restart_at.clear()
                self._signal_all(signal.SIGTERM)
            self._advance_reload()
            self._sync_metrics()
            if stopping and not any(c.proc.poll() is None for c in self._all()):
                break
            if not stopping:
                self._restart_due()
            sig.wait(0.1)
        # Children that died on their own and were waiting for a restart are not part of the stop.
        codes = [c.proc.returncode for c in self.children.values() if not c.died]
        codes += [c.proc.returncode for c in self.old]
        log.info("supervisor stopped; worker exit codes %s", codes, event="supervisor_stopped")
        if fatal:
            return fatal
        if sig.stops() or sig.cold():  # asked to stop: a child ended by a signal of that stop stopped as asked
            return EXIT_OK if all(c <= 0 for c in codes) else EXIT_FAILED
        return EXIT_OK if all(c == 0 for c in codes) else EXIT_FAILED

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
            if code is not None and not stopping:
                self._abandon_reload(f"new worker process {slot} (pid {c.pid}) did not start ({describe_exit(code)})")
                break
        for slot, c in self.children.items():
            c.poll_ready()
            code = c.proc.poll()
            if code is None or c.died or stopping:
                continue
            c.died = True
            healthy_before = c.ready or slot in self.was_ready
            if code == EXIT_CONFIG and not healthy_before:
                log.error("worker process %d (pid %d) cannot start: configuration error or permanent broker error (see "
                          "its log above); the supervisor stops instead of restarting it", slot, c.proc.pid,
                          event="child_config_error")
                return EXIT_CONFIG
            lived = time.monotonic() - c.started
            backoff = self.backoffs.setdefault(slot, Backoff(0.5, MAX_BACKOFF, jitter=False))
            if code == EXIT_CONFIG:
                if c.ready and lived >= QUICK_DEATH:
                    backoff.reset()  # it served a while: this is a new run of errors
                delay = backoff.next()
                alive = sum(1 for o in self.children.values() if o is not c and o.alive())
                log.error("worker process %d (pid %d) stopped with a permanent error (exit code 2: permissions revoked, "
                          "vhost or user removed, connection limit? see its log above); this slot served before, so it is "
                          "retried in %.1fs (attempt %d) while %d other worker processes keep serving", slot, c.pid,
                          delay, backoff.attempt, alive, event="child_permanent_error")
                c.close()
                self.restart_at[slot] = time.monotonic() + delay
                continue
            if c.hung:
                delay = backoff.next()
            elif lived >= QUICK_DEATH:
                backoff.reset()
                delay = 0.5
            else:
                delay = backoff.next()  # 1, 2, 4, ... seconds for a child that keeps dying at once
            why = f"crash loop: died {backoff.attempt} times in a row within {QUICK_DEATH:g}s of starting; " \
                if backoff.attempt >= 2 else ""
            log.error("worker process %d (pid %d) died (%s) after %.1fs; %srestarting it in %.1fs",
                      slot, c.proc.pid, describe_exit(code), lived, why, delay, event="child_died")
            c.close()
            self.restart_at[slot] = time.monotonic() + delay
        return 0

    def _check_readiness(self, stopping: bool) -> None:
        """Kill and report children that missed the readiness timeout (main thread). A current child is then reaped
        and restarted with backoff like a crash; a reload's new child fails the reload (old children keep serving)."""
        now = time.monotonic()
        for c in [*self.children.values(), *self.pending.values()]:
            if c.poll_ready():
                self.was_ready.add(c.slot)
            elif c.overdue(now, self.ready_timeout):
                log.error("worker process %d (pid %d) did not report ready within %gs of its start (a task module that "
                          "hangs at import? a broker that does not answer?); killing it", c.slot, c.pid,
                          self.ready_timeout, event="child_not_ready")
                c.kill_hung()
        if not stopping and any(c.hung for c in self.pending.values()):
            self._abandon_reload(f"a new worker process did not report ready within {self.ready_timeout:g}s")

    def _abandon_reload(self, why: str) -> None:
        log.error("reload failed: %s; keeping the running workers on the old code (send SIGHUP again to retry)", why,
                  event="reload_failed")
        for c in self.pending.values():
            c.stop(STOP_WAIT)
            c.close()
        self.pending.clear()

    def _log_status(self) -> None:
        """SIGUSR1 (main thread): one line for the tree, and each ready child logs its own (USR1 forwarded)."""
        now = time.monotonic()
        for c in self._all():
            c.poll_ready()  # a child may have said so since the last turn
        parts = [c.status(now) for c in self.children.values() if c.alive()]
        parts += [f"process {slot} restarting in {max(0.0, at - now):.1f}s" for slot, at in sorted(self.restart_at.items())]
        if self.pending:
            parts.append(f"reload in progress ({sum(c.poll_ready() for c in self.pending.values())} of "
                         f"{len(self.pending)} new processes ready)")
        if self.old:
            parts.append(f"{len(self.old)} old processes stopping after a reload")
        log.info("status: supervisor pid %d, %d worker processes: %s", os.getpid(), self.processes, "; ".join(parts),
                 event="supervisor_status")
        for c in self._all():
            if c.alive() and c.ready:
                c.proc.send_signal(signal.SIGUSR1)

    def _restart_due(self) -> None:
        now = time.monotonic()
        for slot, when in list(self.restart_at.items()):
            if now >= when:
                del self.restart_at[slot]
                self.children[slot] = self.spawn(slot)
                if self.metrics is not None:
                    self.metrics.restarted(slot)

    def _start_reload(self) -> None:
        if self.pending:  # the operator may have fixed the code since: start over with what is there now
            log.warning("SIGHUP during a reload: abandoning its %d new worker processes and starting over",
                        len(self.pending), event="reload_restarted")
            for c in self.pending.values():
                c.stop(STOP_WAIT)
                c.close()
            self.pending.clear()
        log.info("reload: starting %d worker processes with freshly imported code", self.processes, event="reload")
        for slot in range(1, self.processes + 1):
            self.pending[slot] = self.spawn(slot)

    def _advance_reload(self) -> None:
        if not self.pending or not all(c.poll_ready() for c in self.pending.values()):
            return
        log.info("reload: new worker processes are ready; stopping the old ones warmly", event="reload_ready")
        for slot, new in self.pending.items():
            old = self.children.get(slot)
            if old is not None and old.proc.poll() is None:
                old.proc.send_signal(signal.SIGTERM)
                self.old.append(old)
            self.restart_at.pop(slot, None)
            self.backoffs.pop(slot, None)
            self.children[slot] = new
        self.pending.clear()
