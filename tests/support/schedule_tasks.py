"""Tasks for the schedule e2e tests: a periodic task whose queue no test worker consumes (the test reads the ticks
from it), and a plain one the workers do consume."""

import os

from magne import task

PREFIX = os.environ["MAGNE_TEST_PREFIX"]


@task(queue=f"{PREFIX}.ticks", every=float(os.environ.get("MAGNE_TEST_EVERY", "1")))
def tick():
    """Never run by the tests' workers (they consume only PREFIX.main)."""


@task(queue=f"{PREFIX}.main")
def plain(n):
    return n
