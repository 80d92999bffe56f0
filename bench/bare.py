"""The ceiling reference for the raw workload: a bare consume-and-ack loop.

One I/O thread, 8 threads doing json.loads, eager coalesced acks, prefetch 256,
built from magne's own protocol pieces (connection, hot-frame decoder, coalescer)
but none of the worker: no registry, no time-limit slots, no dead-lettering, no
shutdown protocol. What magne loses against this is the worker's own overhead.
Run: python -m bench.bare QUEUE (stops on SIGTERM).
"""

from __future__ import annotations

import json
import os
import selectors
import signal
import sys
import threading
from collections import deque
from queue import SimpleQueue

from pamqp import commands

from bench.blocking import open_blocking, rpc
from magne.acks import AckCoalescer
from magne.amqp import codec
from magne.amqp.url import parse_url


def main(queue: str, threads: int = 8, prefetch: int = 256) -> None:
    conn = open_blocking(parse_url("amqp://guest:guest@127.0.0.1:5672/%2F"), "bench bare loop")
    rpc(conn, commands.Basic.Qos(prefetch_count=prefetch), commands.Basic.QosOk)
    work: SimpleQueue[tuple[int, bytes]] = SimpleQueue()
    done: deque[int] = deque()
    wake = os.eventfd(0, os.EFD_NONBLOCK)
    pending = [False]

    def on_content(_ch, method, _header, body):
        work.put((method[1], body))

    def worker():
        while True:
            tag, body = work.get()
            json.loads(body)
            done.append(tag)
            if not pending[0]:
                pending[0] = True
                os.eventfd_write(wake, 1)

    conn.on_content = on_content
    rpc(conn, commands.Basic.Consume(queue=queue, consumer_tag="bare"), commands.Basic.ConsumeOk)
    for _ in range(threads):
        threading.Thread(target=worker, daemon=True).start()
    stop = [False]
    signal.signal(signal.SIGTERM, lambda *_: stop.__setitem__(0, True))
    sock = conn.sock
    assert sock is not None
    sock.setblocking(False)
    sel = selectors.DefaultSelector()
    sel.register(sock, selectors.EVENT_READ, "sock")
    sel.register(wake, selectors.EVENT_READ, "wake")
    acks = AckCoalescer()
    while not stop[0]:
        for key, _ in sel.select(0.5):
            if key.data == "wake":
                try:
                    os.eventfd_read(wake)
                except BlockingIOError:
                    pass
            else:
                data = sock.recv(262144)
                if not data:
                    return
                conn.decoder.feed(data)
        pending[0] = False
        tags = []
        while done:
            tags.append(done.popleft())
        if tags:
            sock.setblocking(True)
            sock.sendall(b"".join(codec.encode_ack(1, t, m) for t, m in acks.settle(tags)))
            sock.setblocking(False)


if __name__ == "__main__":
    main(sys.argv[1])
