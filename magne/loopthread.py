"""An event loop in a thread of its own that task code cannot end, and that says who holds it when it stops turning.

The base of magne.asyncpool.AsyncPool (which adds the task runs). Threads: `magne-asyncio` runs the loop; the
worker's main thread calls `start`, `stop`, `join`, `dead` and `check_lag` (from the watchdog tick).

- Task code may stop the loop (`loop.stop()`) or let SystemExit or KeyboardInterrupt out of a background task
  (asyncio lets those two out of run_forever): either would leave every later async message waiting unstarted
  forever, so the loop is entered again (`_serve`), unless it fails 20 times within a second.
- A loop that does not come back for LAG_WARNING is reported with the run whose step holds it (the loop thread's
  Guard, magne.timelimits); the I/O thread owns the heartbeats, so a blocked loop never costs the connection.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections import deque

from magne import logs, wire
from magne.errors import ConfigError
from magne.timelimits import Guard

log = logs.Log("magne.asyncpool")

LAG_WARNING = 0.5  # seconds the loop may go without turning before the watchdog reports who holds it
BEAT = 0.1  # how often the loop stamps `beat`


class LoopThread:
    def __init__(self, loop_kind: str = "asyncio") -> None:
        if loop_kind not in ("asyncio", "uvloop"):
            raise ConfigError(f"--event-loop must be asyncio or uvloop, not {loop_kind!r}")
        if loop_kind == "uvloop":
            try:
                import uvloop  # noqa: F401 - an optional extra, imported only when asked for
            except ImportError:
                raise ConfigError("--event-loop uvloop needs uvloop: pip install 'magne[uvloop]'") from None
        self.loop_kind = loop_kind
        self.guard = Guard()  # which run's step the loop thread is inside (magne.timelimits)
        self.loop: asyncio.AbstractEventLoop | None = None
        self.thread: threading.Thread | None = None
        self.beat = time.monotonic()
        self.stalls = 0  # times the loop was held past LAG_WARNING
        self.failed = ""  # why the loop thread ended on its own (the worker then stops: see Worker._run)
        self._stalled_since = 0.0
        self._stall_by = ""  # who held the loop in the stall being reported
        self._stopping = False  # stop() was called: the loop may end
        self._started = threading.Event()

    # -- for the subclass ---------------------------------------------------------------------------------------
    def _on_start(self, loop: asyncio.AbstractEventLoop) -> None:
        """Loop thread, before the loop first runs."""

    def _on_wind_down(self) -> None:
        """Loop thread, once the loop stopped for good, before what still runs on it is cancelled."""

    def _cancellable(self, atask: asyncio.Task[None]) -> bool:
        """Loop thread, winding down: whether to cancel this Task left on the loop (else it is only waited for)."""
        return True

    # -- lifecycle (main thread) -----------------------------------------------------------------------------------
    def start(self) -> None:
        self.thread = threading.Thread(target=self._thread_main, name="magne-asyncio", daemon=True)
        self.thread.start()
        self._started.wait(10.0)

    def stop(self) -> None:
        """Main thread, after the I/O thread ended: stop the loop once it is idle (warm) or now (after a cold
        stop's grace, whatever still runs has its message back at the broker already)."""
        self._stopping = True
        loop = self.loop
        if loop is not None and not loop.is_closed():
            try:
                loop.call_soon_threadsafe(loop.stop)
            except RuntimeError:
                pass

    def join(self, timeout: float) -> None:
        if self.thread is not None:
            self.thread.join(timeout)

    def dead(self) -> bool:
        """Main thread: the loop thread ended without being asked to."""
        return self.thread is not None and not self.thread.is_alive() and not self._stopping

    # -- the loop thread ---------------------------------------------------------------------------------------
    def _thread_main(self) -> None:
        if self.loop_kind == "uvloop":
            import uvloop  # an optional extra (checked in __init__)

            loop: asyncio.AbstractEventLoop = uvloop.new_event_loop()
        else:
            loop = asyncio.new_event_loop()
        self.loop = loop
        asyncio.set_event_loop(loop)
        self.guard.ident = threading.get_ident()
        loop.call_soon(self._beat)
        self._on_start(loop)
        self._started.set()
        try:
            self._serve(loop)
        except BaseException as exc:  # noqa: B036 - never end silently: the worker sees `failed` and stops
            self.failed = f"the event loop thread crashed ({type(exc).__name__}: {wire.safe_text(exc, 200)})"
            log.exception("%s; the worker stops, its async messages go back to the queue", self.failed,
                          event="loop_crashed")
        self._on_wind_down()
        try:
            # Whatever still runs was cut by a cold stop (its message is back at the broker): cancel it and give it
            # a moment to unwind, so its finally blocks run and the loop closes without "destroyed but pending".
            left = [t for t in asyncio.all_tasks(loop) if not t.done()]
            for t in left:
                if self._cancellable(t):
                    t.cancel()
            if left:
                loop.run_until_complete(asyncio.wait(left, timeout=1.0))
            loop.run_until_complete(loop.shutdown_asyncgens())
        except BaseException as exc:  # noqa: B036 - the process is stopping; say so and close the loop anyway
            log.warning("event loop did not wind down cleanly (%s); closing it", type(exc).__name__)
        finally:
            loop.close()

    def _serve(self, loop: asyncio.AbstractEventLoop) -> None:
        """Run the loop until stop() asks; enter it again after anything task code does to end it (module doc)."""
        restarts: deque[float] = deque(maxlen=20)
        while True:
            try:
                loop.run_forever()
            except BaseException as exc:  # noqa: B036 - see above; nothing from task code may end this thread
                restarts.append(time.monotonic())
                if len(restarts) == restarts.maxlen and restarts[-1] - restarts[0] < 1.0:
                    raise  # the loop cannot run at all: give up, so that the worker stops and is restarted
                log.error("the event loop was stopped by %s raised in async task code; running it again",
                          type(exc).__name__, event="loop_restarted")
                continue
            if self._stopping:
                return
            log.error("the event loop was stopped by async task code (loop.stop()); running it again",
                      event="loop_restarted")

    def _beat(self) -> None:
        self.beat = time.monotonic()
        assert self.loop is not None
        self.loop.call_later(BEAT, self._beat)

    # -- the watchdog (main thread) ---------------------------------------------------------------------------
    def check_lag(self, now: float) -> None:
        """Report a loop held past LAG_WARNING, once per stall, with the run whose step holds it; and its end."""
        lag = now - self.beat
        if lag >= LAG_WARNING:
            if not self._stalled_since:
                self._stalled_since = self.beat
                self.stalls += 1
                held = self.guard.clock
                d = getattr(held, "d", None)
                who = (f"task {logs.clean(d.task, 100)} (message {d.message_id()})" if d is not None
                       else "code outside any task")
                self._stall_by = who
                log.warning("event loop blocked for %.1fs so far by %s: an async def task is running blocking code; "
                            "the other async tasks wait until it returns (heartbeats go on: the I/O thread owns them)",
                            lag, who, event="loop_blocked", task=d.task if d is not None else "")
        elif self._stalled_since:
            log.info("event loop running again after being blocked for %.1fs by %s", self.beat - self._stalled_since,
                     self._stall_by, event="loop_unblocked")
            self._stalled_since = 0.0
