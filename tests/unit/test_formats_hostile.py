"""Forged dramatiq and celery messages found in review (magne.formats): each is refused or honoured as documented,
never mistaken for a task failure, never run later or longer than it asked."""

from __future__ import annotations

import orjson
import pytest
from pamqp import commands

from magne import formats, task
from magne.amqp import codec
from magne.delivery import Delivery
from magne.errors import BadMessage
from magne.registry import REGISTRY

BOTH = formats.Accept(frozenset({"dramatiq", "celery"}), frozenset({"default"}))
NOW = 1_800_000_000.0
EMBED = {"callbacks": None, "errbacks": None, "chain": None, "chord": None}


@pytest.fixture
def registry():
    saved = dict(REGISTRY)
    REGISTRY.clear()
    task(name="app.add", queue="default")(lambda a=0, b=0: None)
    task(name="app.cadd", queue="celery")(lambda a=0, b=0: None)
    yield dict(REGISTRY)
    REGISTRY.clear()
    REGISTRY.update(saved)


def delivery(body: bytes, queue: str = "default", header: bytes | None = None) -> Delivery:
    if header is None:
        header = codec.header_payload(commands.Basic.Properties(delivery_mode=2), len(body))
    return Delivery(1, 1, queue, body, header, False)


def celery_header(headers=None, **props) -> bytes:
    h = {"task": "app.cadd", "id": "c-1", **(headers or {})}
    return codec.header_payload(commands.Basic.Properties(content_type="application/json", content_encoding="utf-8",
                                                          headers=h, **props), 10)


def resolve(d: Delivery, registry, now=NOW):
    return formats.resolve(d, registry, formats.Accept(BOTH.formats, BOTH.dramatiq_queues, lambda: now))


@pytest.mark.parametrize("value", ["1" + "0" * 400, "-1" + "0" * 400])
def test_a_time_limit_beyond_any_float_is_refused_not_a_task_failure(registry, value):
    """json allows integers of any size; float(10**400) raises OverflowError, which was taken for the task's own
    failure (reason "task raised", retried)."""
    body = b'{"actor_name": "app.add", "args": [1], "options": {"time_limit": %s}}' % value.encode()
    with pytest.raises(BadMessage, match="options.time_limit"):
        resolve(delivery(body), registry)
