"""magne.testing as the README describes it (issue 20): its stand-in publisher has the real one's sending methods,
and the worker defaults the README states are the code's (which follow `magne worker`'s)."""

from __future__ import annotations

import asyncio
import inspect
import re
from pathlib import Path

from magne import task
from magne.cli import build_parser
from magne.publisher import BatchResult, Publisher, Target, default_publisher
from magne.testing import Worker, worker

README = Path(__file__).resolve().parents[2] / "docs" / "testing.md"  # the manual's page on magne.testing


@task
def tp_add(x, y):
    return x + y


@task
async def tp_async_add(x, y):
    return x + y


def test_default_publisher_send_many_works_in_tests_as_the_readme_shows():
    with worker(0) as w:
        result = default_publisher().send_many([(tp_add, (1, 2)), (tp_add, [3, 4], {}), (tp_async_add, (5, 6))])
        assert isinstance(result, BatchResult) and result.ok and len(result.sent) == 3
        w.join()
    assert sorted(r.args for r in w.succeeded()) == [[1, 2], [3, 4], [5, 6]]
    assert [r.message_id for r in sorted(w.succeeded(), key=lambda r: r.args)] == result.message_ids


def test_default_publisher_send_and_send_async_work_in_tests():
    with worker(2) as w:
        pub = default_publisher()
        mid = pub.send(tp_add, (1, 2), message_id="given-id")
        assert mid == "given-id"
        other = pub.send(Target("tp_add", tp_add.queue), [2, 3], {}, delay=5)

        async def from_a_loop() -> str:
            return await pub.send_async(tp_add, (3, 4))

        third = asyncio.run(from_a_loop())
        w.join()
    assert {r.message_id for r in w.succeeded(tp_add)} == {"given-id", other, third}
    [delayed] = [s for s in w.sent if s.message_id == other]
    assert delayed.delay == 5


def test_the_stand_in_takes_the_same_arguments_as_the_real_publisher():
    for name in ("send", "send_many", "send_async"):
        real = inspect.signature(getattr(Publisher, name))
        stand_in = inspect.signature(getattr(Worker, name))
        assert list(stand_in.parameters) == list(real.parameters), name


def test_the_readme_states_the_testing_workers_real_defaults():
    text = README.read_text()
    m = re.search(r"The worker's defaults, as `magne worker` takes them: `worker\(([^)]*)\)`", text)
    assert m, "the README names magne.testing's defaults"
    stated = {k.strip(): float(v) for k, v in (kv.split("=") for kv in m.group(1).replace("\n", " ").split(","))}
    params = inspect.signature(Worker.__init__).parameters
    assert stated == {k: float(params[k].default) for k in stated}
    cli = build_parser().parse_args(["worker", "tasks"])
    assert stated == {k: float(getattr(cli, k)) for k in stated}  # the code follows `magne worker`
