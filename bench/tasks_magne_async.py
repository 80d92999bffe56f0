"""The async-latency workload on magne: an `async def` task, run on the worker's event-loop thread
(`magne worker bench.tasks_magne_async --async-concurrency 1000`, bench/peers.py)."""

from bench import bodies
from magne import task

Q = "bench-magne-async"
async_sleep_incr = task(name="async_sleep_incr", queue=Q)(bodies.async_sleep_incr)
