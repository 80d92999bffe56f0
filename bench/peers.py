"""How each peer is started, and how its messages are put on the broker.

Every peer gets the same task bodies (bench/bodies.py) and the same argument lists;
only the envelope differs (each peer's own message format, published with pika
into the queue the peer itself declared, persistent, without confirms, so that
pre-enqueueing is fast and identical in cost).
"""

from __future__ import annotations

import dataclasses
import os
import sys
from collections.abc import Callable
from typing import Any

import pika

PY = sys.executable


@dataclasses.dataclass
class Peer:
    name: str
    queue: str
    command: Callable[[int | None], list[str]]  # prefetch (None: the peer's default) -> argv
    env: Callable[[int | None], dict[str, str]]
    messages: Callable[[str, list[list[Any]]], list[tuple[bytes, pika.BasicProperties]]]  # (task, arglists)
    declare: Callable[[], None]
    extra_queues: tuple[str, ...] = ()


def _magne_declare(queue: str = "bench-magne") -> None:
    from magne.amqp.url import parse_url
    from magne.engine.client import Client
    from magne.topology import declarations

    with Client(parse_url("amqp://guest:guest@127.0.0.1:5672/%2F"), "bench declare") as c:
        for method, reply in declarations(queue):
            c.call(method, reply)


def _magne_messages(name: str, arglists: list[list[Any]]) -> list[tuple[bytes, pika.BasicProperties]]:
    from magne import wire

    props = pika.BasicProperties(delivery_mode=2, content_type="application/json")
    return [(wire.encode(name, args), props) for args in arglists]


def magne(processes: int = 1, metrics: bool = False, events: bool = True) -> Peer:
    def command(prefetch: int | None) -> list[str]:
        cmd = [PY, "-m", "magne", "--log-level", "warning", "worker", "bench.tasks_magne", "--threads", "8"]
        if processes > 1:
            cmd += ["--processes", str(processes)]
        if prefetch:
            cmd += ["--prefetch", str(prefetch)]
        if metrics:  # metrics on (a free local port), for the cost of --metrics against plain `magne`
            cmd += ["--metrics", "127.0.0.1:0"]
        if not events:  # task events off, for their cost against plain `magne` (events on by default)
            cmd += ["--events", "off"]
        return cmd

    return Peer(
        name=("magne" if processes == 1 else f"magne-p{processes}") + ("-metrics" if metrics else "")
        + ("" if events else "-events-off"),
        queue="bench-magne",
        command=command,
        env=lambda prefetch: {},
        messages=_magne_messages,
        declare=_magne_declare,
        extra_queues=("bench-magne.dead", "bench-magne.due"),
    )


def _dramatiq_declare() -> None:
    from bench import tasks_dramatiq

    # dramatiq declares a queue once per process; the bench deletes it between runs.
    tasks_dramatiq.broker.queues_pending.add(tasks_dramatiq.Q)
    tasks_dramatiq.broker.declare_queue(tasks_dramatiq.Q, ensure=True)
    tasks_dramatiq.broker.close()


def _dramatiq_messages(name: str, arglists: list[list[Any]]) -> list[tuple[bytes, pika.BasicProperties]]:
    from bench import tasks_dramatiq, tasks_dramatiq_async

    actor = getattr(tasks_dramatiq, name, None) or getattr(tasks_dramatiq_async, name)
    props = pika.BasicProperties(delivery_mode=2)  # what dramatiq's own enqueue sets
    return [(actor.message(*args).encode(), props) for args in arglists]


def dramatiq() -> Peer:
    return Peer(
        name="dramatiq",
        queue="bench-dramatiq",
        command=lambda prefetch: [PY, "-m", "dramatiq", "bench.tasks_dramatiq", "--processes", "1", "--threads", "8"],
        env=lambda prefetch: {"dramatiq_queue_prefetch": str(prefetch)} if prefetch else {},
        messages=_dramatiq_messages,
        declare=_dramatiq_declare,
        extra_queues=("bench-dramatiq.DQ", "bench-dramatiq.XQ"),
    )


def _celery_declare() -> None:
    from bench import tasks_celery

    with tasks_celery.app.connection_for_write() as conn:
        tasks_celery.app.amqp.queues[tasks_celery.Q].bind(conn.default_channel).declare()


def celery() -> Peer:
    def env(prefetch: int | None) -> dict[str, str]:
        # Celery's prefetch is multiplier x concurrency (8 threads): 256 = 32 x 8.
        return {"BENCH_CELERY_MULTIPLIER": str(prefetch // 8)} if prefetch else {}

    return Peer(
        name="celery",
        queue="bench-celery",
        command=lambda prefetch: [PY, "-m", "celery", "-A", "bench.tasks_celery", "worker", "--pool", "threads",
                                  "-c", "8", "--loglevel", "WARNING"],
        env=env,
        messages=_celery_messages,
        declare=_celery_declare,
    )


def _celery_messages(name: str, arglists: list[list[Any]]) -> list[tuple[bytes, pika.BasicProperties]]:
    """Celery protocol-2 messages built by celery itself (task name and id travel in headers)."""
    import uuid

    from kombu.serialization import dumps

    from bench import tasks_celery

    out = []
    for args in arglists:
        tid = str(uuid.uuid4())
        m = tasks_celery.app.amqp.create_task_message(tid, name, args, {})
        content_type, encoding, body = dumps(m.body, serializer="json")
        props = pika.BasicProperties(delivery_mode=2, content_type=content_type, content_encoding=encoding,
                                     headers=m.headers, correlation_id=tid)
        out.append((body if isinstance(body, bytes) else body.encode(), props))
    return out


# -- the async-latency workload (benchmarks.md, 6): one worker process, 1,000 tasks in flight ------------------
# Every peer gets its prefetch from the workload (1,000), so that all 1,000 messages are delivered at once.
ASYNC_IN_FLIGHT = 1000


def _dramatiq_async_declare() -> None:
    from bench import tasks_dramatiq_async as t

    t.broker.queues_pending.add(t.Q)
    t.broker.declare_queue(t.Q, ensure=True)
    t.broker.close()


def dramatiq_async() -> Peer:
    """dramatiq's AsyncIO middleware: each message holds one worker thread while its coroutine runs on
    the middleware's event-loop thread, so 1,000 in flight needs 1,000 threads, and a prefetch of 1,000
    (dramatiq's default would be 2 x threads)."""
    return Peer(
        name="dramatiq-async",
        queue="bench-dramatiq-async",
        command=lambda prefetch: [PY, "-m", "dramatiq", "bench.tasks_dramatiq_async", "--processes", "1",
                                  "--threads", str(ASYNC_IN_FLIGHT)],
        env=lambda prefetch: {"dramatiq_queue_prefetch": str(prefetch or ASYNC_IN_FLIGHT)},
        messages=_dramatiq_messages,
        declare=_dramatiq_async_declare,
        extra_queues=("bench-dramatiq-async.DQ", "bench-dramatiq-async.XQ"),
    )


def _taskiq_declare() -> None:
    """What the taskiq worker declares at start-up (its broker's startup() declares the exchange, the
    dead-letter queue and the task queue with their arguments), so the messages can go in first."""
    import asyncio

    from bench import tasks_taskiq

    async def declare() -> None:
        await tasks_taskiq.broker.startup()
        await tasks_taskiq.broker.shutdown()

    asyncio.run(declare())


def _taskiq_messages(name: str, arglists: list[list[Any]]) -> list[tuple[bytes, pika.BasicProperties]]:
    """taskiq's own message, built by its kicker and formatter, with the headers and delivery mode
    taskiq-aio-pika's kick() gives it."""
    from bench import tasks_taskiq

    task = getattr(tasks_taskiq, name)
    out = []
    for args in arglists:
        msg = tasks_taskiq.broker.formatter.dumps(task.kicker()._prepare_message(*args))
        props = pika.BasicProperties(delivery_mode=2, headers={"task_id": msg.task_id, "task_name": msg.task_name,
                                                               **msg.labels})
        out.append((msg.message, props))
    return out


def taskiq() -> Peer:
    """taskiq-aio-pika: one worker process (--workers 1, under taskiq's supervisor process), 1,000 async
    tasks at once (--max-async-tasks), and an AMQP prefetch (the broker's qos) of 1,000. taskiq acks
    after the task (its default ack type, when_saved, with no result backend)."""
    return Peer(
        name="taskiq",
        queue="bench-taskiq",
        command=lambda prefetch: [PY, "-m", "taskiq", "worker", "bench.tasks_taskiq:broker", "--workers", "1",
                                  "--max-async-tasks", str(ASYNC_IN_FLIGHT), "--log-level", "WARNING"],
        env=lambda prefetch: {"BENCH_TASKIQ_QOS": str(prefetch or ASYNC_IN_FLIGHT)},
        messages=_taskiq_messages,
        declare=_taskiq_declare,
        extra_queues=("bench-taskiq.dead",),
    )


def magne_async() -> Peer:
    """magne running an `async def` task on its event-loop thread, 1,000 at once. A queue whose tasks are all
    `async def` takes its prefetch from --async-concurrency (1.25 x 1,000; --prefetch is the threads' and
    does not apply to it), so every one of the 1,000 messages arrives at once, as with the other peers."""
    def command(prefetch: int | None) -> list[str]:
        return [PY, "-m", "magne", "--log-level", "warning", "worker", "bench.tasks_magne_async",
                "--async-concurrency", str(ASYNC_IN_FLIGHT)]

    return Peer(
        name="magne-async",
        queue="bench-magne-async",
        command=command,
        env=lambda prefetch: {},
        messages=_magne_messages,
        declare=lambda: _magne_declare("bench-magne-async"),
        extra_queues=("bench-magne-async.dead", "bench-magne-async.due"),
    )


def _magne_results_messages(name: str, arglists: list[list[Any]]) -> list[tuple[bytes, pika.BasicProperties]]:
    """magne's messages that ask for their result (x-magne-results), each with the message id its record names."""
    from magne import wire, workflow

    out = []
    for args in arglists:
        mid = workflow.new_id()
        props = pika.BasicProperties(delivery_mode=2, content_type="application/json", message_id=mid,
                                     headers={wire.RESULTS_HEADER: True})
        out.append((wire.encode(name, args, None, mid), props))
    return out


def _magne_results_declare() -> None:
    """The task queue, and the results stream (a new one each run: declared before the worker's first record)."""
    from bench.tasks_results import STREAM, Q
    from magne.amqp.url import parse_url
    from magne.engine.client import Client
    from magne.workflow import configure, stream_declaration

    _magne_declare(Q)
    configure(stream=STREAM)
    with Client(parse_url("amqp://guest:guest@127.0.0.1:5672/%2F"), "bench declare") as c:
        c.call(*stream_declaration())


def magne_results(results: bool) -> Peer:
    """The results workload: magne on the throughput workload's task (its own queue, bench/tasks_results.py), every
    message with results=True (results-on) or none (results-off): the cost of recording each outcome in the stream."""
    from bench.tasks_results import STREAM, Q

    def command(prefetch: int | None) -> list[str]:
        cmd = [PY, "-m", "magne", "--log-level", "warning", "worker", "bench.tasks_results", "--threads", "8",
               "--queues", Q]
        return cmd + ["--prefetch", str(prefetch)] if prefetch else cmd

    return Peer(name="results-on" if results else "results-off", queue=Q, command=command,
                env=lambda prefetch: {"MAGNE_RESULTS_STREAM": STREAM},
                messages=_magne_results_messages if results else _magne_messages, declare=_magne_results_declare,
                extra_queues=(f"{Q}.dead", f"{Q}.due", STREAM))


def bare() -> Peer:
    """The ceiling reference (bench/bare.py), on magne's messages."""
    return dataclasses.replace(magne(), name="bare-loop", command=lambda prefetch: [PY, "-m", "bench.bare", "bench-magne"])


def magne_base() -> Peer:
    """magne as it was at another commit, for before/after figures in one run.

    BENCH_MAGNE_BASE names a checkout of that commit (`git worktree add /tmp/magne-base REV`, or
    `git archive REV magne | tar -x -C /tmp/magne-base`); the worker runs through bench/base.py,
    which imports magne from there (PYTHONPATH alone loses to the editable install's finder), on
    the same messages, queue and settings as the current `magne`.
    """
    base = os.environ.get("BENCH_MAGNE_BASE", "")
    if not base:
        raise SystemExit("magne-base needs BENCH_MAGNE_BASE=<a checkout of the commit to compare with>")
    cur = magne()
    return dataclasses.replace(cur, name="magne-base", command=lambda prefetch: [PY, "-m", "bench.base",
                                                                              *cur.command(prefetch)[2:]],
                               env=lambda prefetch: {"BENCH_MAGNE_BASE": base})


ALL: dict[str, Callable[[], Peer]] = {
    "bare-loop": bare,
    "magne": magne,
    "magne-base": magne_base,
    "magne-p2": lambda: magne(2),
    "magne-metrics": lambda: magne(metrics=True),
    "magne-events-off": lambda: magne(events=False),
    "results-off": lambda: magne_results(False),
    "results-on": lambda: magne_results(True),
    "dramatiq": dramatiq,
    "celery": celery,
    "dramatiq-async": dramatiq_async,
    "taskiq": taskiq,
    "magne-async": magne_async,
}


def compile_sources() -> None:
    """Compile the bytecode of every checkout a peer runs from source (this one, the bench, $BENCH_MAGNE_BASE), once,
    before anything is timed, so that every peer starts from bytecode as an installed package does.

    pip compiles dramatiq's, celery's and pika's bytecode at install time, but magne is installed editable and the
    magne-base checkout is not installed at all; where PYTHONDONTWRITEBYTECODE is set (it is on this workplace's
    machines) every magne worker compiled its whole source at each start: about 120 ms of a 320 ms start-up
    (measured 2026-12-06), counted against magne in every workload timed from the launch.
    """
    import compileall

    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    dirs = [os.path.join(here, "magne"), os.path.join(here, "bench")]
    base = os.environ.get("BENCH_MAGNE_BASE", "")
    if base:
        dirs.append(os.path.join(base, "magne"))
    for d in dirs:  # an optimisation: a file that does not compile, or a directory not writable, is said, not fatal
        if os.path.isdir(d) and not compileall.compile_dir(d, quiet=2):
            print(f"bench: some of {d} could not be compiled to bytecode; those modules compile at each start",
                  file=sys.stderr)


def clean_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("dramatiq_", "BENCH_", "MAGNE_"))}
    env["PYTHONPATH"] = os.getcwd()
    return env
