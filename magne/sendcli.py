"""`magne send`: publish task messages from the command line, confirmed (its options and its run).

Imported by magne.cli at start (for its options); what a send needs (the publisher, and with --module the task
modules) is imported only when it runs, so that other commands do not pay for it.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from magne import limits, topology, wire
from magne.errors import EXIT_CONFIG, EXIT_FAILED, EXIT_OK, ConfigError

if TYPE_CHECKING:
    from magne.publisher import TaskLike


def add_parser(sub: Any, logging_opts: argparse.ArgumentParser, url_help: str, positive: Callable[[str], object]) -> None:
    """The `send` subcommand's options (magne.cli.build_parser, main thread)."""
    s = sub.add_parser("send", parents=[logging_opts], help="publish one task message (confirmed)",
                       description="Publish task messages. The task's queue: --queue, else the one its @task names in "
                                   "--module, else the task name in upper case (the @task default).")
    s.add_argument("task", help="task name")
    s.add_argument("--args", default="[]", help="JSON array of positional arguments")
    s.add_argument("--kwargs", default="{}", help="JSON object of keyword arguments")
    s.add_argument("--module", action="append", metavar="MODULE",
                   help="import this task module (repeatable) and send to the queue, queue type and priority its "
                        "@task gives the task; without it the queue is --queue or the task name in upper case, which "
                        "is not where a task declared with @task(queue=...) listens")
    s.add_argument("--queue", help="queue of the task (default: from --module, else the task name in upper case)")
    s.add_argument("--count", type=positive, default=1, help="publish this many copies")
    s.add_argument("--declare", action="store_true",
                   help="declare the queue, its exchange and dead-letter queue if missing (default: publish only to a "
                        "queue that exists, so that a typo creates nothing)")
    s.add_argument("--queue-type", choices=["classic", "quorum"], default=None,
                   help="with --declare: the type to declare, the same as the worker's (default: the task's with "
                        "--module, else classic)")
    s.add_argument("--url", help=url_help)


def run(args: argparse.Namespace) -> int:
    """`magne send`: --count copies in one pipelined batch (Publisher.send_many); prints each confirmed id.
    Exit 1 if any copy failed (each failure on stderr), 2 if the queue does not exist (without --declare)."""
    from magne.publisher import NoSuchQueue, Publisher

    try:
        call_args = wire.loads(args.args)
        call_kwargs = wire.loads(args.kwargs)
    except ValueError as exc:
        print(f"magne send: --args/--kwargs must be JSON: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    if type(call_args) is not list or type(call_kwargs) is not dict:
        print("magne send: --args must be a JSON array and --kwargs a JSON object", file=sys.stderr)
        return EXIT_CONFIG
    target = _target(args)
    pub = Publisher(args.url, queue_type=target.queue_type or args.queue_type or "classic")
    try:
        result = pub.send_many(((target, call_args, call_kwargs) for _ in range(args.count)), declare=args.declare)
        if args.declare:
            limits.warn(pub.params, [target.queue])  # a drop-head limit would drop what was just confirmed
    finally:
        pub.close()
    for f in result.failed:
        if isinstance(f.error, NoSuchQueue):
            raise f.error  # one line from main(), exit 2: fix it first
    if result.failed and not result.sent and len({str(f.error) for f in result.failed}) == 1:
        raise result.failed[0].error  # all failed the same way (the broker is unreachable, say): one line
    if result.sent:
        print("\n".join(result.sent))
    for f in result.failed:
        print(f"magne send: message {f.message_id} was not published ({f.reason}): {f.error}", file=sys.stderr)
    return EXIT_FAILED if result.failed else EXIT_OK


def _target(args: argparse.Namespace) -> TaskLike:
    """The task to send to: its queue and type from --queue/--queue-type, else from its @task in --module (then
    the task itself, so its priority and max_priority apply too)."""
    from magne.publisher import Target

    if not args.module:
        return Target(args.task, args.queue or topology.default_queue(args.task), args.queue_type or "classic")
    from magne.registry import REGISTRY
    from magne.worker import import_tasks

    import_tasks(args.module)
    task = REGISTRY.get(args.task)
    if task is None:
        raise ConfigError(f"no task named {args.task!r} in {', '.join(args.module)}; its tasks: "
                          f"{', '.join(sorted(REGISTRY))}")
    if args.queue is None and args.queue_type is None:
        return task
    return Target(task.name, args.queue or task.queue, args.queue_type or task.queue_type or "classic")
