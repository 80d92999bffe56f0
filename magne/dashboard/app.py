"""`magne dashboard`: the fleet in a browser, served by starlette under uvicorn (the `dashboard` extra).

What it shows and where it comes from:
- queues (ready, unacked, consumers, dead letters): magne.status.gather, the management API where it answers, else
  passive declares over AMQP (unacked unknown then);
- workers and what they run now: magne.control.gather (`magne inspect`);
- per-task counts, rates, latencies over the last hour and recent failures: the events stream (magne.events),
  replayed from its retention start at every start (History), then followed.

Read-only unless started with `--allow-actions`: then POST /api/cancel and /api/replay act, for a request that
carries the token (`Authorization: Bearer <token>`), compared in constant time; a token is generated and printed
if none is given. Listening beyond 127.0.0.1 is the operator's choice; the token is what guards the actions.

Threads: uvicorn's (the requests: they read the last state, never wait for the broker, but for an action);
`magne-dashboard` (refreshes queues and workers every REFRESH seconds); the publisher Client's loop thread (the
events stream into History).
"""

from __future__ import annotations

import hmac
import secrets
import threading
import time
from typing import Any

import uvicorn
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, Response
from starlette.routing import Route

from magne import cancels, control, dead, events, logs, status
from magne.dashboard.history import History
from magne.dashboard.page import live, page
from magne.publisher import Publisher

log = logs.Log("magne.dashboard")

REFRESH = 2.0


class Dashboard:
    def __init__(self, url: str | list[str] | None, queues: list[str], management: str | None = None,
                 allow_actions: bool = False, token: str | None = None) -> None:
        self.url, self.queues, self.management = url, list(queues), management
        self.allow_actions = allow_actions
        self.token = (token or secrets.token_urlsafe(18)) if allow_actions else ""
        self.pub = Publisher(url)
        self.history = History()
        self.state: dict[str, Any] = {"queues": [], "workers": [], "queue_source": "not read yet", "updated": None}
        self._stop = threading.Event()

    def start(self) -> None:
        """Main thread: replay and follow the events stream, start refreshing queues and workers."""
        events.follow(self.pub._running(), self.history.add, time.time() - events.retention())
        threading.Thread(target=self._refresh_loop, name="magne-dashboard", daemon=True).start()

    def stop(self) -> None:
        self._stop.set()
        self.pub.close()

    def _refresh_loop(self) -> None:
        while not self._stop.is_set():
            self.refresh()
            self._stop.wait(REFRESH)

    def refresh(self) -> None:
        """magne-dashboard thread: queues and workers now. A broker that does not answer is shown, not raised."""
        state = dict(self.state)
        with self.history.lock:
            seen = set(self.history.queues)
        queues = sorted(set(self.queues) | seen)
        try:
            if queues:
                report = status.gather(queues, self.url, "auto", self.management, None, sample=0)
                state["queues"] = [q.__dict__ for q in report.queues]
                state["queue_source"] = report.source_detail
        except Exception as exc:
            state["queue_source"] = f"unavailable ({type(exc).__name__}: {logs.clean(str(exc), 200)})"
        try:
            state["workers"] = control.gather(self.pub, 0.5)
        except Exception as exc:
            log.warning("inspect failed: %s", logs.clean(str(exc), 200), event="dashboard_inspect_failed")
        state["updated"] = time.time()
        self.state = state

    def full_state(self) -> dict[str, Any]:
        return {**self.state, "history": self.history.snapshot(), "actions": self.allow_actions}

    # -- the web layer ---------------------------------------------------------------------------------------------
    def app(self) -> Starlette:
        async def index(_r: Request) -> Response:
            return HTMLResponse(page(self.full_state(), self.allow_actions))

        async def fragment(_r: Request) -> Response:
            return HTMLResponse(live(self.full_state()))

        async def api_state(_r: Request) -> Response:
            return JSONResponse(self.full_state())

        async def api_cancel(r: Request) -> Response:
            refused = self._refuse(r)
            if refused:
                return refused
            given = (await _json(r)).get("ids")
            if not isinstance(given, list):  # a string would be cancelled one character at a time
                return JSONResponse({"message": "ids must be a JSON array of message ids"}, status_code=400)
            try:
                ids = await run_in_threadpool(cancels.cancel, *given, publisher=self.pub)
            except ValueError as exc:
                return JSONResponse({"message": str(exc)}, status_code=400)
            log.info("dashboard: cancelled %d message(s)", len(ids), event="dashboard_cancel")
            return JSONResponse({"message": f"cancelled {len(ids)} message(s)", "ids": ids})

        async def api_replay(r: Request) -> Response:
            refused = self._refuse(r)
            if refused:
                return refused
            queue = (await _json(r)).get("queue")
            if not isinstance(queue, str) or queue not in {q["name"] for q in self.state["queues"]}:
                return JSONResponse({"message": "not a queue this dashboard shows"}, status_code=400)
            n = await run_in_threadpool(dead.dead_replay, self.url if isinstance(self.url, str) else None, queue)
            log.info("dashboard: replayed %d dead letters of %s", n, queue, event="dashboard_replay")
            return JSONResponse({"message": f"replayed {n} dead letters of {queue}"})

        return Starlette(routes=[
            Route("/", index), Route("/fragment", fragment), Route("/api/state", api_state),
            Route("/api/cancel", api_cancel, methods=["POST"]), Route("/api/replay", api_replay, methods=["POST"]),
        ])

    def _refuse(self, r: Request) -> Response | None:
        if not self.allow_actions:
            return JSONResponse({"message": "read-only: start the dashboard with --allow-actions"}, status_code=403)
        given = r.headers.get("authorization", "").removeprefix("Bearer ").strip()
        if not hmac.compare_digest(given.encode(), self.token.encode()):
            return JSONResponse({"message": "wrong or missing token"}, status_code=401)
        return None


async def _json(r: Request) -> dict[str, Any]:
    try:
        body = await r.json()
    except ValueError:
        return {}
    return body if isinstance(body, dict) else {}


def serve(dash: Dashboard, host: str, port: int) -> int:
    """Main thread: start the dashboard and serve until Ctrl-C / SIGTERM (uvicorn handles the signals)."""
    dash.start()
    if dash.allow_actions:
        print(f"magne dashboard: actions allowed with the token {dash.token}", flush=True)
    print(f"magne dashboard: http://{host}:{port}/", flush=True)
    try:
        uvicorn.Server(uvicorn.Config(dash.app(), host=host, port=port, log_level="warning")).run()
    finally:
        dash.stop()
    return 0
