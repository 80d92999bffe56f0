"""The fleet's commands: `magne cancel`, `magne inspect`, `magne dashboard` (and their parsers), kept out of
magne/cli.py so that it stays one screen of wiring. magne.cli imports this module only when it builds its parser or
runs one of these; the dashboard's web layer (an optional extra) only when it runs."""

from __future__ import annotations

import argparse
import importlib
import os
import sys
import time
from typing import Any

import orjson

from magne import control, logs, outcomes
from magne.errors import EXIT_CONFIG, EXIT_OK, ConfigError
from magne.publisher import Publisher
from magne.registry import REGISTRY, queues_of

COMMANDS = ("cancel", "inspect", "dashboard")


def add_parsers(sub: Any, parents: list[argparse.ArgumentParser], url_help: str) -> None:
    c = sub.add_parser("cancel", parents=parents,
                       help="cancel messages by id: one not started never runs, one running is interrupted "
                            "(kept MAGNE_CANCEL_RETENTION seconds, 24 h by default, across worker restarts)")
    c.add_argument("ids", nargs="+", metavar="ID", help="message id(s), as `magne send` and task.send return them")
    c.add_argument("--url", help=url_help)
    c.add_argument("--wait", type=float, default=outcomes.LOOKUP, metavar="SECONDS",
                   help="seconds to look up whether each message already finished (default 2; 0: do not look)")
    c.add_argument("--format", choices=["text", "json"], default="text")
    i = sub.add_parser("inspect", parents=parents,
                       help="every live worker process: host, pid, queues, threads, uptime, and what each runs now")
    i.add_argument("--url", help=url_help)
    i.add_argument("--wait", type=float, default=1.0, help="seconds to gather answers (default 1)")
    i.add_argument("--format", choices=["text", "json"], default="text")
    d = sub.add_parser("dashboard", parents=parents, help="serve a web page of queues, workers, task rates, latencies "
                       "and failures (pip install 'magne[dashboard]')")
    d.add_argument("modules", nargs="*", metavar="MODULE", help="task module(s) whose queues to show")
    d.add_argument("--queues", nargs="+", metavar="QUEUE", default=[], help="these queues too")
    d.add_argument("--url", help=url_help)
    d.add_argument("--listen", default="127.0.0.1:9720", metavar="HOST:PORT", help="default 127.0.0.1:9720")
    d.add_argument("--management", metavar="URL", help="the management API (default: the broker host, port 15672)")
    d.add_argument("--allow-actions", action="store_true",
                   help="allow cancel and dead-letter replay from the page, with a token (MAGNE_DASHBOARD_TOKEN, "
                        "else one is generated and printed)")


def run(args: argparse.Namespace) -> int:
    if args.command == "dashboard":
        return dashboard(args)
    pub = Publisher(args.url)
    try:
        if args.command == "cancel":
            try:
                done = outcomes.cancel(*args.ids, publisher=pub, check=args.wait > 0, timeout=args.wait)
            except ValueError as exc:
                print(f"magne cancel: {exc}", file=sys.stderr)
                return EXIT_CONFIG
            if args.format == "json":
                print(orjson.dumps([r.as_dict() for r in done], option=orjson.OPT_INDENT_2).decode())
            else:
                print("\n".join(cancel_line(r) for r in done))
            return EXIT_OK
        replies = control.gather(pub, args.wait)
        if args.format == "json":
            print(orjson.dumps(replies, option=orjson.OPT_INDENT_2).decode())
        else:
            print("\n".join(text(replies)))
        return EXIT_OK
    finally:
        pub.close()


def dashboard(args: argparse.Namespace) -> int:
    try:
        from magne.dashboard.app import Dashboard, serve
    except ImportError as exc:
        raise ConfigError(f"magne dashboard needs its extra: pip install 'magne[dashboard]' ({exc})") from None
    host, _, port = args.listen.rpartition(":")
    if not port.isdigit() or not host:
        raise ConfigError(f"--listen {args.listen!r}: give HOST:PORT")
    for name in args.modules:
        try:
            importlib.import_module(name[:-3].replace("/", ".") if name.endswith(".py") else name)
        except Exception as exc:
            raise ConfigError(f"cannot import task module {name!r}: {type(exc).__name__}: {exc}") from None
    queues = list(dict.fromkeys(queues_of(REGISTRY) + args.queues))
    dash = Dashboard(args.url, queues, args.management, args.allow_actions, os.environ.get("MAGNE_DASHBOARD_TOKEN"))
    return serve(dash, host.strip("[]"), int(port))


def text(replies: list[dict[str, Any]]) -> list[str]:
    """`magne inspect` as lines for a person."""
    if not replies:
        return ["no worker process answered"]
    now = time.time()
    lines = [f"{len(replies)} worker process(es)"]
    for r in replies:  # every value as the process sent it, escaped: a message id is the publisher's to choose
        c = _show
        queues = r.get("queues") if isinstance(r.get("queues"), list) else []
        lines.append(f"{c(r.get('host'))} pid {c(r.get('pid'))}: magne {c(r.get('version'))}, up "
                     f"{_ago(r.get('uptime'))}, {c(r.get('threads'))} threads, {c(r.get('busy'))} running, queues "
                     f"{', '.join(c(q) for q in queues)}")
        for t in r.get("running") if isinstance(r.get("running"), list) else []:
            if not isinstance(t, dict):
                continue
            started, limit = t.get("started"), t.get("time_limit")
            took = f"for {_ago(now - started)}" if isinstance(started, int | float) else "not started"
            limit_ = f"{limit:g}s" if isinstance(limit, int | float) else "none"
            lines.append(f"  {c(t.get('thread'))}: {c(t.get('task'))} (message {c(t.get('message_id'))}, queue "
                         f"{c(t.get('queue'))}) {took}, time limit {limit_}")
    return lines


def cancel_line(r: outcomes.CancelResult) -> str:
    """`magne cancel`'s line for one id, for a person (every value escaped: ids and reasons are publishers')."""
    c = logs.clean
    mid = c(r.id, 120)
    if r.state == "finished":
        where = f" on {c(str(r.host), 80)} pid {c(str(r.pid), 12)}" if r.host else ""
        what = c(str(r.outcome), 40)
        why = f" ({c(r.reason, 120)}" + (f": {c(str(r.error.get('type')), 60)}" if isinstance(r.error, dict) else "") \
            + ")" if r.reason else ""
        task = f", task {c(r.task, 80)}" if r.task else ""
        note = f", {c(r.note, 120)}" if r.note else ""
        at = f" at {_at(r.at)}" if isinstance(r.at, int | float) else ""
        return (f"{mid}: already finished: {what}{why}{at}{where}{task}{note}; the cancel is recorded anyway (a "
                "duplicate or retry of it still in flight will not run)")
    if r.state == "cancelled":  # this cancel stopped it: it had not finished (magne.outcomes)
        where = f" on {c(str(r.host), 80)} pid {c(str(r.pid), 12)}" if r.host else ""
        task = f", task {c(r.task, 80)}" if r.task else ""
        note = f" ({c(r.note, 120)})" if r.note else ""
        at = f" at {_at(r.at)}" if isinstance(r.at, int | float) else ""
        return f"{mid}: cancelled: stopped by this cancel{at}{where}{task}{note}; it had not finished"
    if r.state == "unknown" and r.note == "not looked up":
        return f"{mid}: cancelled: it will not run if it has not started; if it is running it is interrupted"
    tail = "it will not run if it has not started; if it is running it is interrupted"
    last = f"; last seen {c(str(r.outcome), 20)} at {_at(r.at)}" if r.outcome and isinstance(r.at, int | float) \
        else ""
    if r.state == "not-seen":
        since = f" since {_at(r.since)}" if r.since else " in all the records kept"
        note = f" ({c(r.note, 120)})" if r.note else ""
        return f"{mid}: cancelled: not finished as far as the records show{since}{note}{last}: {tail}"
    return f"{mid}: cancelled: not known whether it already finished ({c(str(r.note), 160)}){last}: {tail}"


def _at(t: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(t))


def _show(value: Any) -> str:
    """One value of an answer for the terminal: control characters escaped (no escape sequence reaches it), cut."""
    return logs.clean(value if isinstance(value, str) else str(value), 200)


def _ago(seconds: Any) -> str:
    if not isinstance(seconds, int | float):
        return "?"
    s = max(0, int(seconds))
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s" if s >= 60 else f"{s}s"
