"""Where a raw message's CPU goes, stage by stage, on one thread: a budget without noise.

`python -m bench.cpu_per_message` measures the worker whole, and on this 2-core machine its figure moves by
10-20 % from one run to the next (the broker, the scheduler, the other core). This runs each stage of the
per-message path with magne's own objects, on the calling thread, best of R rounds of N messages:

- decode: the consuming connection's frame decoder (codec.Decoder) and the consumer's `_on_content`, which makes
  the Delivery and puts it on the work queue (what the I/O thread does per delivery);
- run: `Runner.run` of the raw workload's `noop` task, with its time-limit slot, and the report into a deque
  (what a pool thread does);
- events: the task event recorded on report (`Events.wrap`) and its share of the events thread's `_flush`;
- settle: `Settlement.drain` of the outcomes, down to the coalesced ack frames in the outbox (the I/O thread).

Beside each, the same stage of the `bare-loop` ceiling (bench/bare.py: the same decoder, a tuple on the work
queue, `json.loads`, the same ack coalescer). Each sum against `cpu_per_message`'s microseconds per message is what
the threads' hand-offs, the kernel and the GIL cost on top. Run: python -m bench.hot_path [N] [ROUNDS]
"""

from __future__ import annotations

import gc
import json
import sys
import time
import uuid
from collections import deque
from collections.abc import Callable
from queue import SimpleQueue
from typing import Any

from pamqp import body as pbody
from pamqp import commands
from pamqp import frame as pframe
from pamqp import header as pheader

from magne import events, wire
from magne.acks import AckCoalescer
from magne.amqp import codec
from magne.amqp.outbox import Outbox
from magne.amqp.url import Nodes, parse_url
from magne.delivery import Delivery
from magne.engine.sender import Sender
from magne.io.consumer import Consumer, Phase
from magne.io.settle import Settlement
from magne.io.stats import Stats
from magne.outgoing import json_header
from magne.registry import Task, task
from magne.runner import Runner
from magne.timelimits import Slot

CTAG = "bench-ctag"
QUEUE = "bench-hot-path"


def deliveries(n: int) -> list[bytes]:
    """n basic.deliver + header + body frames as a broker sends them, cut in 256 KiB reads (RECV_SIZE)."""
    parts = []
    for i in range(1, n + 1):
        body = wire.encode("noop", [], {})
        header = pheader.ContentHeader(0, len(body), commands.Basic.Properties(
            content_type="application/json", delivery_mode=2, message_id=uuid.uuid4().hex))
        parts += (pframe.marshal(commands.Basic.Deliver(consumer_tag=CTAG, delivery_tag=i, exchange="",
                                                        routing_key=QUEUE), 1),
                  pframe.marshal(header, 1), pframe.marshal(pbody.ContentBody(body), 1))
    blob = b"".join(parts)
    return [blob[i:i + 262144] for i in range(0, len(blob), 262144)]


def best(rounds: int, n: int, setup: Callable[[], Any], stage: Callable[[Any], None]) -> float:
    """Microseconds per message of `stage(state)`, the best of `rounds` (setup not timed). The garbage collector is
    off while a stage runs, as timeit has it: a stage keeps N messages alive where the worker keeps a prefetch's
    worth, so its collections would be the harness's, not the worker's (the worker's own GC time is measured in
    place: docs/performance.md)."""
    top = float("inf")
    for _ in range(rounds):
        state = setup()
        gc.collect()
        gc.disable()
        try:
            t0 = time.perf_counter()
            stage(state)
            top = min(top, time.perf_counter() - t0)
        finally:
            gc.enable()
    return top / n * 1e6


def main(n: int = 20_000, rounds: int = 7) -> dict[str, float]:
    reads = deliveries(n)
    stats = Stats()
    nodes = Nodes([parse_url("amqp://127.0.0.1:1/")])  # never connected to
    sender = Sender(nodes, "bench hot path")
    settlement = Settlement(sender, stats, 131072)
    noop = task(name="noop", queue=QUEUE)(lambda: None)
    tasks: dict[str, Task] = {"noop": noop}
    slot = Slot(0)
    slot.ident = 0

    def consumer(work: SimpleQueue[Delivery | None]) -> Consumer:
        c = Consumer(nodes, "bench", [QUEUE], 256, {}, work, settlement, stats, 0, 131072, lambda: None, {})
        c.phase, c.gen = Phase.CONSUMING, 1
        c.ctags[CTAG.encode()] = QUEUE
        return c

    def decode_setup() -> tuple[codec.Decoder, SimpleQueue[Delivery | None]]:
        work: SimpleQueue[Delivery | None] = SimpleQueue()
        dec = codec.Decoder(consumer(work)._on_content, lambda _ch, _f: None)
        dec.channels_open = {1}
        return dec, work

    def decode(state: tuple[codec.Decoder, SimpleQueue[Delivery | None]]) -> None:
        feed = state[0].feed
        for r in reads:
            feed(r)

    def made() -> list[Delivery]:
        dec, work = decode_setup()
        decode((dec, work))
        return [work.get() for _ in range(n)]  # type: ignore[misc]

    runner = Runner(tasks, lambda _d: None)

    def run(ds: list[Delivery]) -> None:
        out: deque[Delivery] = deque()  # what the I/O thread drains; emptied by it, so one per round here
        go, report = runner.run, out.append
        for d in ds:
            go(slot, d)
            if slot.clock is not None:  # as Pool._loop: the runner left the step itself unless an interrupt landed
                slot.leave()
            d.started = slot.started
            report(d)

    class Room:  # what the events thread publishes to, minus the broker
        def has_room(self, _n: int) -> bool:
            return True

        def publish(self, _msg: Any) -> None:
            pass

    def events_setup() -> tuple[events.Events, list[Delivery]]:
        ev = events.Events(lambda: Room())  # type: ignore[arg-type, return-value]
        ds = []
        for i in range(n):
            d = Delivery(i + 1, 1, QUEUE, b"", json_header(uuid.uuid4().hex, 40), False)
            d.task, d.started = "noop", time.monotonic()
            ds.append(d)
        return ev, ds

    def record_and_flush(state: tuple[events.Events, list[Delivery]]) -> None:
        ev, ds = state
        reporting = ev.wrap(lambda _d: None)
        for d in ds:
            reporting(d)
        room = Room()
        while ev.buf:
            ev._flush(room)  # type: ignore[arg-type]

    def settle_setup() -> deque[Delivery]:
        settlement.reset(1, Outbox())
        return deque(Delivery(i + 1, 1, QUEUE, b"", b"", False) for i in range(n))

    def settle(outcomes: deque[Delivery]) -> None:
        # as the I/O thread meets them: a turn drains what arrived since the last one (here, 64 at a time)
        drain = settlement.drain
        batch: deque[Delivery] = deque()
        while outcomes:
            for _ in range(min(64, len(outcomes))):
                batch.append(outcomes.popleft())
            drain(batch, 0.0)

    # bench/bare.py's stages, as it runs them
    def bare_decode_setup() -> tuple[codec.Decoder, SimpleQueue[tuple[int, bytes]]]:
        work: SimpleQueue[tuple[int, bytes]] = SimpleQueue()
        dec = codec.Decoder(lambda _ch, method, _h, body: work.put((method[1], body)), lambda _ch, _f: None)
        dec.channels_open = {1}  # as the bare loop's Connection has it
        return dec, work

    def bare_made() -> list[tuple[int, bytes]]:
        dec, work = bare_decode_setup()
        decode((dec, work))  # type: ignore[arg-type]
        return [work.get() for _ in range(n)]

    def bare_run(items: list[tuple[int, bytes]]) -> None:
        done: deque[int] = deque()
        for tag, body in items:
            json.loads(body)
            done.append(tag)

    def bare_settle(tags: deque[int]) -> None:
        acks = AckCoalescer()
        while tags:
            batch = [tags.popleft() for _ in range(min(64, len(tags)))]
            b"".join(codec.encode_ack(1, t, m) for t, m in acks.settle(batch))

    figures = {
        "decode (I/O thread)": (best(rounds, n, decode_setup, decode), best(rounds, n, bare_decode_setup, decode)),
        "run noop (pool thread)": (best(rounds, n, made, run), best(rounds, n, bare_made, bare_run)),
        "events (pool + events thread)": (best(rounds, n, events_setup, record_and_flush), 0.0),
        "settle and ack (I/O thread)": (best(rounds, n, settle_setup, settle),
                                        best(rounds, n, lambda: deque(range(1, n + 1)), bare_settle)),
    }
    print(f"{'us per message':32} {'magne':>7} {'bare-loop':>10}")
    for name, (us, bare) in figures.items():
        print(f"{name:32} {us:7.2f} {bare:10.2f}")
    print(f"{'sum':32} {sum(v[0] for v in figures.values()):7.2f} {sum(v[1] for v in figures.values()):10.2f}"
          f"   (best of {rounds} x {n:,}; one thread, no broker)")
    return {k: v[0] for k, v in figures.items()}


if __name__ == "__main__":
    main(*(int(a) for a in sys.argv[1:3]))
