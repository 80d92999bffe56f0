"""The `magne` command: worker, send, dead, status, demo."""

from __future__ import annotations

import argparse
import math
import os
import sys
from urllib.parse import urlsplit

from magne import logs, sendcli
from magne.amqp.url import query_warnings, resolve_urls
from magne.errors import EXIT_CONFIG, EXIT_FAILED, EXIT_OK, MagneError
from magne.pidfile import pid_file

log = logs.Log("magne")


def _positive(kind: type, least: float = 0.0) -> object:
    def parse(text: str) -> object:
        value = kind(text)
        if kind is float and not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"must be a finite number of seconds, got {text}")
        if value <= 0 or value < least:
            raise argparse.ArgumentTypeError(f"must be {f'at least {least:g}' if least else 'positive'}, got {text}")
        return value

    return parse


def _log_options(p: argparse.ArgumentParser, default: object) -> None:
    """--log-level and --log-format, before the subcommand (with their defaults) and after it (default=SUPPRESS, so
    that one left out there keeps what was given before it)."""
    p.add_argument("--log-level", default=default if default is not None else "info",
                   choices=["debug", "info", "warning", "error"])
    p.add_argument("--log-format", default=default if default is not None else "text", choices=["text", "json"],
                   help="text (default) or json: one object per line with stable field names")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="magne", description="RabbitMQ task worker: one connection, one channel, one I/O thread per process."
    )
    _log_options(p, None)
    logging_opts = argparse.ArgumentParser(add_help=False)
    _log_options(logging_opts, argparse.SUPPRESS)
    sub = p.add_subparsers(dest="command", required=True)

    url_help = ("broker URL; several nodes of a cluster: repeat --url, or separate URLs with ',' or ';' "
                "(default: $MAGNE_URL, else amqp://guest:guest@localhost:5672/%%2F). Prefer MAGNE_URL: `ps` shows argv")

    w = sub.add_parser("worker", parents=[logging_opts], help="run a worker for the tasks in MODULE")
    w.add_argument("modules", nargs="+", metavar="MODULE",
                   help="module(s) defining @task functions, imported with the current directory on sys.path")
    w.add_argument("--url", action="append", help=url_help)
    w.add_argument("--threads", type=_positive(int), default=8, help="worker threads per process (default 8)")
    w.add_argument("--prefetch", type=_positive(int), default=None,
                   help="unacked deliveries per consumed queue (default 2 x threads); the process may hold "
                        "prefetch x number of queues at once, since RabbitMQ applies it per consumer")
    w.add_argument("--queues", nargs="+", metavar="QUEUE",
                   help="consume only these queues (default: every queue of the registered tasks)")
    w.add_argument("--shutdown-timeout", type=_positive(float), default=30.0,
                   help="seconds a warm shutdown waits for running tasks (default 30)")
    w.add_argument("--time-limit", type=_positive(float), default=600.0,
                   help="default task time limit in seconds (default 600, below RabbitMQ's 30-minute consumer_timeout)")
    w.add_argument("--queue-type", choices=["classic", "quorum"], default="classic",
                   help="type of the queues this worker declares, for tasks without their own queue_type "
                        "(quorum: replicated, with a delivery limit that dead-letters poison messages)")
    w.add_argument("--max-retries", type=int, default=0,
                   help="default retries of a task that raised or ran past its time limit (default 0: dead-letter "
                        "at once); @task(max_retries=...) overrides")
    w.add_argument("--min-backoff", type=_positive(float), default=1.0,
                   help="shortest retry delay in seconds; the first retry waits 1-2 x this (default 1)")
    w.add_argument("--max-backoff", type=_positive(float), default=300.0, help="longest retry delay (default 300)")
    w.add_argument("--processes", type=_positive(int), default=1,
                   help="worker processes under one supervisor (default 1). Threads share one GIL: use about one "
                        "process per core for CPU-bound tasks; for I/O-bound tasks 1-2 processes per core, each "
                        "with more threads. Every process holds exactly one broker connection")
    w.add_argument("--pid-file", help="write the supervisor's (or the single worker's) pid here")
    w.add_argument("--ready-timeout", type=_positive(float), default=60.0, metavar="SECONDS",
                   help="under --processes: seconds a worker process has to connect and report ready (default 60); "
                        "one that misses it is killed and reported (then restarted, or its reload fails)")
    w.add_argument("--lost-after", type=_positive(float), default=10.0,
                   help="seconds after a time-limit interrupt before a thread that did not stop is replaced, and after "
                        "a time limit's cancel before an async task that did not stop is abandoned (default 10)")
    w.add_argument("--max-body-size", type=_positive(int), default=None, metavar="BYTES",
                   help="dead-letter bodies larger than this (reason 'body too large') instead of running them "
                        "(default: no limit). A worker holds up to prefetch x queues bodies at once")
    w.add_argument("--async-concurrency", type=_positive(int), default=100, metavar="N",
                   help="`async def` tasks running at once on the process's event loop (default 100; raise it for "
                        "many slow network calls). A queue of async tasks only prefetches 1.25 x N")
    w.add_argument("--event-loop", choices=["asyncio", "uvloop"], default="asyncio",
                   help="the event loop for async def tasks (uvloop: pip install 'magne[uvloop]')")
    w.add_argument("--accept", action="append", metavar="FORMATS",
                   help="also run messages of these formats: dramatiq, celery or dramatiq,celery (magne's own is always "
                        "accepted); see docs/migration.md")
    w.add_argument("--dramatiq-queues", nargs="+", metavar="QUEUE",
                   help="with --accept dramatiq: the queues that are dramatiq's (default: every queue consumed)")
    w.add_argument("--metrics", metavar="HOST:PORT",
                   help="serve Prometheus metrics at http://HOST:PORT/metrics (off unless given; PORT alone listens on "
                        "127.0.0.1, :PORT on every interface, port 0 picks a free one). Under --processes one endpoint "
                        "shows every process and their sums")
    w.add_argument("--no-scheduler", action="store_true",
                   help="never send the ticks of periodic tasks (@task(every=/cron=)); by default every worker whose "
                        "tasks define schedules is a candidate and one of them leads (docs/schedules.md)")
    w.add_argument("--schedule-grace", type=_positive(float, 5.0), default=300.0, metavar="SECONDS",
                   help="a new scheduler leader sends ticks missed by at most this long and skips older ones "
                        "(default 300, at least 5: a tick later than this is skipped even from a leader that woke late)")
    w.add_argument("--schedule-stream", default="magne.schedule", metavar="NAME",
                   help="the stream (and exchange) that records ticks; workers of one fleet must agree "
                        "(default magne.schedule)")
    w.add_argument("--control", choices=["on", "off"], default="on",
                   help="honour `magne cancel` and answer `magne inspect` (default on; needs RabbitMQ streams, 3.9+)")
    w.add_argument("--events", choices=["on", "off"], default="on", help="publish task events (default on)")

    sendcli.add_parser(sub, logging_opts, url_help, _positive(int))

    dead = sub.add_parser("dead", parents=[logging_opts], help="inspect, replay or purge a queue's dead letters")
    dead_sub = dead.add_subparsers(dest="dead_command", required=True)
    for name, text in (("list", "count and the newest dead letters with their reasons"),
                       ("replay", "move dead letters back to the task queue (confirmed, then removed)"),
                       ("purge", "delete every dead letter of the queue")):
        c = dead_sub.add_parser(name, parents=[logging_opts], help=text)
        c.add_argument("queue", metavar="QUEUE", help="the task queue (or its .dead queue)")
        c.add_argument("--url", help=url_help)
        if name == "list":
            c.add_argument("--newest", type=_positive(int), default=5, help="how many of the newest to show")
        if name == "replay":
            c.add_argument("--limit", type=_positive(int), default=None, help="replay at most this many")

    st = sub.add_parser("status", parents=[logging_opts],
                        help="ready, unacked, consumers and rates of the task queues, their dead-letter and "
                        "delay queues, and (with --metrics) what each worker process is doing")
    st.add_argument("modules", nargs="*", metavar="MODULE", help="task module(s) whose queues to show")
    st.add_argument("--queues", nargs="+", metavar="QUEUE", help="these queues (instead of, or besides, a module's)")
    st.add_argument("--url", help=url_help)
    st.add_argument("--source", choices=["auto", "http", "amqp"], default="auto",
                    help="auto (default): the management HTTP API if it answers, else passive declares over AMQP")
    st.add_argument("--management", metavar="URL",
                    help="the management API (default: http://<broker host>:15672 with the broker URL's login)")
    st.add_argument("--metrics", action="append", metavar="URL",
                    help="a worker's or supervisor's --metrics endpoint (repeatable): show each process's threads and "
                         "running tasks")
    st.add_argument("--sample", type=float, default=1.0,
                    help="seconds between the two reads that give the AMQP source its rate (default 1)")
    st.add_argument("--watch", nargs="?", type=_positive(float), const=2.0, default=None, metavar="SECONDS",
                    help="refresh in place every SECONDS (default 2) until Ctrl-C")
    st.add_argument("--format", choices=["text", "json"], default="text", help="json: one object per refresh")
    st.add_argument("--schedule-stream", default="magne.schedule", metavar="NAME",
                    help="the workers' --schedule-stream, to show their periodic tasks (default magne.schedule)")

    r = sub.add_parser("result", parents=[logging_opts], help="print a message's outcome (sent with results=True)")
    r.add_argument("message_id", metavar="ID")
    r.add_argument("--timeout", type=_positive(float), default=5.0, help="seconds to wait for it (default 5)")
    r.add_argument("--url", help=url_help)

    from magne import controlcli

    controlcli.add_parsers(sub, [logging_opts], url_help)
    d = sub.add_parser("demo", parents=[logging_opts], help="start a worker, send a demo batch, print what ran, stop the worker")
    d.add_argument("--count", type=_positive(int), default=2000)
    d.add_argument("--threads", type=_positive(int), default=8)
    d.add_argument("--url", help=url_help)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logs.setup(args.log_level, args.log_format)
    urls = getattr(args, "url", None)
    if urls and any(_has_password(u) for u in ([urls] if isinstance(urls, str) else urls)):
        log.warning("--url carries a password, which every user of this machine can read in `ps`; "
                    "put the URL in MAGNE_URL instead", event="password_in_argv")
    # status without --url may never touch AMQP; a supervised child's supervisor warned already
    if (args.command != "status" or urls) and not os.environ.get("MAGNE_READY_FD"):
        for u in resolve_urls(urls):
            for line in query_warnings(u):
                log.warning("%s", line, event="url_parameter_unknown")
    try:
        if args.command == "worker":
            return _worker(args)
        if args.command == "send":
            return sendcli.run(args)
        if args.command == "dead":
            return _dead(args)
        if args.command == "status":
            return _status(args)
        if args.command == "result":
            from magne.results import print_result

            return print_result(args.message_id, args.url, args.timeout)
        if args.command in ("cancel", "inspect", "dashboard"):
            from magne import controlcli

            return controlcli.run(args)
        if args.command == "demo":
            from magne.demo import run_demo

            return run_demo(args.count, args.threads, args.url)
    except MagneError as exc:
        log.error("%s", exc, event="failed")
        return EXIT_CONFIG if exc.permanent else EXIT_FAILED
    except BrokenPipeError:  # `magne inspect | head`: the reader left; no traceback, and none at exit either
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_FAILED
    finally:
        logs.flush()
    return EXIT_CONFIG


def _has_password(url: str) -> bool:
    try:
        return bool(urlsplit(url).password)
    except ValueError:
        return False


def _worker(args: argparse.Namespace) -> int:
    from magne.worker import Options, Worker, import_tasks, worker_signals

    opts = Options(modules=args.modules, url=args.url, threads=args.threads, prefetch=args.prefetch,
                   queues=args.queues, shutdown_timeout=args.shutdown_timeout,
                   time_limit=args.time_limit, lost_after=args.lost_after, queue_type=args.queue_type,
                   max_retries=args.max_retries, min_backoff=args.min_backoff, max_backoff=args.max_backoff,
                   max_body_size=args.max_body_size or 0, metrics=args.metrics,
                   async_concurrency=args.async_concurrency, event_loop=args.event_loop,
                   scheduler=not args.no_scheduler, schedule_grace=args.schedule_grace,
                   schedule_stream=args.schedule_stream, accept=args.accept, dramatiq_queues=args.dramatiq_queues,
                   control=args.control == "on", events=args.events == "on")
    with pid_file(args.pid_file):
        if args.processes > 1:
            from magne.supervisor import Supervisor

            sup = Supervisor(opts, args.processes, args.log_level, args.log_format, args.ready_timeout)
            sup.install_signals()
            return sup.run()
        early = worker_signals() if os.environ.get("MAGNE_READY_FD") else None  # a supervised child: see worker_signals
        worker = Worker(opts, import_tasks(opts.modules))
        worker.install_signals(early)
        return worker.run()


def _status(args: argparse.Namespace) -> int:
    from magne import status
    from magne.registry import REGISTRY, queues_of
    from magne.worker import import_tasks

    queues: list[str] = []
    if args.modules:
        import_tasks(args.modules)
        queues = queues_of(REGISTRY)
    queues += [q for q in args.queues or [] if q not in queues]
    if not queues:
        print("magne status: name a task module or --queues", file=sys.stderr)
        return EXIT_CONFIG
    scheduled = [t for t in REGISTRY.values() if t.schedule is not None]
    return status.run(queues, args.url, args.source, args.management, args.metrics, args.sample, args.watch, args.format,
                      scheduled, args.schedule_stream)


def _dead(args: argparse.Namespace) -> int:
    from magne import dead

    if args.dead_command == "list":
        print("\n".join(dead.dead_list(args.url, args.queue, args.newest)))
    elif args.dead_command == "replay":
        print(f"replayed {dead.dead_replay(args.url, args.queue, args.limit)} dead letters of {args.queue}")
    else:
        print(f"purged {dead.dead_purge(args.url, args.queue)} dead letters of {args.queue}")
    return EXIT_OK
