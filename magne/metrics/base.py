"""Where metrics are served: the listen address, the HTTP server, the constants every part shares."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry, start_http_server

from magne import logs
from magne.errors import ConfigError

if TYPE_CHECKING:
    pass

log = logs.Log("magne.metrics")

DURATION_BUCKETS = (0.0001, 0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0,
                    600.0)
REFRESH = 5.0  # seconds between the supervisor's scrapes of its children (besides one per scrape of its own)
CHILD_TIMEOUT = 2.0  # seconds the supervisor waits for one child's metrics
FINAL_ENV = "MAGNE_METRICS_FINAL"  # a directory: a child writes <pid>.prom there as it exits


def parse_listen(text: str) -> tuple[str, int]:
    """`HOST:PORT`, `[IPv6]:PORT`, `:PORT` (every interface) or `PORT` (127.0.0.1 only) -> (host, port)."""
    text = text.strip()
    host, sep, port = text.rpartition(":")
    if not sep:
        host, port = "127.0.0.1", text
    elif not host:
        host = "0.0.0.0"
    host = host.strip("[]")
    try:
        number = int(port)
    except ValueError:
        raise ConfigError(f"--metrics wants HOST:PORT (or PORT for 127.0.0.1), got {text!r}") from None
    if not 0 <= number <= 65535:
        raise ConfigError(f"--metrics port must be between 0 and 65535, got {number}")
    return host, number


def serve(registry: CollectorRegistry, host: str, port: int) -> tuple[Any, int]:
    """Start prometheus_client's HTTP server on a daemon thread (`magne-metrics`); returns (server, bound port)."""
    try:
        server, thread = start_http_server(port, host, registry)
    except OSError as exc:
        raise ConfigError(f"--metrics {host}:{port}: cannot listen there ({exc.strerror or exc})") from None
    thread.name = "magne-metrics"
    return server, server.server_port


def url_of(host: str, port: int) -> str:
    shown = "127.0.0.1" if host in ("0.0.0.0", "") else (f"[{host}]" if ":" in host else host)
    return f"http://{shown}:{port}/metrics"


# -- the pool threads' part: a hook -------------------------------------------------------------
