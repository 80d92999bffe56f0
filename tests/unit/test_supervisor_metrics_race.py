"""The supervisor's metrics never go backwards (issue 20): the poller and a scrape refreshing at once must not let
an older answer from a child overwrite a newer one."""

from __future__ import annotations

import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from magne import metrics


class _SlowFirstChild:
    """A child's /metrics: the first request reads the counter at once but answers only when released (a slow
    scrape); later requests answer at once with the counter as it is then."""

    def __init__(self) -> None:
        self.value = 1.0
        self.first_read = threading.Event()
        self.release = threading.Event()
        self.requests = 0
        child = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 (http.server's name)
                child.requests += 1
                first = child.requests == 1
                value = child.value
                if first:
                    child.first_read.set()
                    child.release.wait(10)
                body = (f"# HELP magne_messages_acked acked\n# TYPE magne_messages_acked counter\n"
                        f'magne_messages_acked_total{{queue="Q",task="t"}} {value}\n').encode()
                self.send_response(200)
                self.send_header("Content-Type", "text/plain; version=0.0.4")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *_args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    @property
    def port(self) -> int:
        return self.server.server_address[1]

    def close(self) -> None:
        self.release.set()
        self.server.shutdown()
        self.server.server_close()


def _acked(sup: metrics.SupervisorMetrics) -> float:
    with sup._lock:
        _families, out = sup.merged()
    key = ("magne_messages_acked_total", (("process", "1"), ("queue", "Q"), ("task", "t")))
    [value] = [series[key] for series in out.values() if key in series]
    return value


def test_a_slow_older_scrape_never_overwrites_a_newer_one(tmp_path):
    sup = metrics.SupervisorMetrics("127.0.0.1:0", str(tmp_path))
    child = _SlowFirstChild()
    try:
        sup.child_up(1, 4242, child.port)
        poller = threading.Thread(target=sup.refresh)  # the poller: its scrape reads 1.0, then stalls
        poller.start()
        assert child.first_read.wait(5)
        child.value = 2.0
        sup.refresh()  # a scrape of the supervisor's endpoint meanwhile: reads 2.0
        assert _acked(sup) == 2.0
        child.release.set()
        poller.join(10)
        assert _acked(sup) == 2.0  # today: 1.0, the counter went backwards
    finally:
        child.close()
