"""The task of bench/formats.py: a no-op on the queue the run names (BENCH_FORMATS_QUEUE)."""

import os

from magne import task


@task(name="noop", queue=os.environ.get("BENCH_FORMATS_QUEUE", "bench-formats"))
def noop() -> None:
    return None
