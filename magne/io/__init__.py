"""The I/O thread and everything it runs: the only code on the worker's sockets.

- `loop.py`: the thread itself: the selector, the wake-up fd, timers, reconnects, shutdown.
- `consumer.py`: the consuming connection and its channel: declare, consume, deliveries in, frame handlers.
- `settle.py`: outcomes back from the pool: coalesced acks, requeues, copies awaiting their confirm.
- `link.py`: the publishing connection that carries retry and dead-letter copies.
- `stats.py`: the counters the I/O thread keeps.
"""
