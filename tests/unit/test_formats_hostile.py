"""Forged dramatiq and celery messages found in review (magne.formats): each is refused or honoured as documented,
never mistaken for a task failure, never run later or longer than it asked."""

from __future__ import annotations

import orjson
import pytest
from pamqp import commands

from magne import dead, formats, task
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


def test_a_hard_limit_under_the_soft_one_is_the_limit(registry):
    """celery kills the task at its hard limit: a soft limit above it must not let the run go on past it."""
    for limits, want in (([1, 100], 1.0), ([100, 2], 2.0), ([None, 3], 3.0), ([4, None], 4.0)):
        d = delivery(orjson.dumps([[1], {}, EMBED]), "celery", celery_header({"timelimit": limits}))
        t, _a, _k = resolve(d, registry)
        assert t.time_limit == want, limits


def test_a_celery_eta_past_2242_is_refused_like_dramatiqs(registry):
    """Not deferred 45 days at a time for ever: docs/migration.md says an eta past the year 2242 is refused."""
    d = delivery(orjson.dumps([[1], {}, EMBED]), "celery", celery_header({"eta": "9999-12-31T00:00:00+00:00"}))
    with pytest.raises(BadMessage, match="eta"):
        resolve(d, registry)


def test_a_message_expiring_before_its_eta_comes_back_when_it_expires(registry):
    """It is dead-lettered as expired at its expiry, not held until an eta at which it can no longer run."""
    hdr = celery_header({"eta": "2027-01-15T09:00:00+00:00", "expires": "2027-01-15T08:01:00+00:00"})
    d = delivery(orjson.dumps([[1], {}, EMBED]), "celery", hdr)
    with pytest.raises(formats.NotDue) as info:
        resolve(d, registry, now=1_800_000_000.0)
    d_meta_expires, now = d.meta.expires, 1_800_000_000.0
    assert info.value.seconds == pytest.approx(d_meta_expires - now)
    with pytest.raises(formats.Expired):
        resolve(delivery(d.body, "celery", hdr), registry, now=d_meta_expires)


@pytest.mark.parametrize(("body", "header", "queue"), [
    (orjson.dumps([[1], {}, {**EMBED, "callbacks": [{"task": "x"}]}]), celery_header(), "celery"),
    (b"\x80\x04\x95..", codec.header_payload(commands.Basic.Properties(
        content_type="application/x-python-serialize", headers={"task": "app.cadd"}), 5), "celery"),
    (orjson.dumps({"actor_name": "app.cadd", "options": {"pipe_target": {}}}), None, "default"),
], ids=["celery-callback", "celery-pickle", "dramatiq-pipeline"])
def test_a_refused_message_still_names_its_task(registry, body, header, queue):
    """The log line and `magne dead list` said "task ?" / "task=" for every refused celery message."""
    d = delivery(body, queue, header)
    with pytest.raises(BadMessage):
        resolve(d, registry)
    assert d.task == "app.cadd"


@pytest.mark.parametrize("wait", [0.0004, 0.05, 1.234, 3650.0, 86_399.999, 45 * 86400.0 - 0.001])
def test_a_deferred_message_runs_at_its_eta_not_up_to_ten_percent_later(registry, wait):
    """Each hop through a wait queue is its TTL (never longer than what is left); the message is due after a few."""
    eta = NOW + wait
    body = orjson.dumps({"actor_name": "app.add", "options": {"eta": eta * 1000}})
    now, hops = NOW, 0
    while True:
        d = delivery(body)
        try:
            resolve(d, registry, now=now)
            break
        except formats.NotDue as not_due:
            formats.defer(d, not_due.seconds, 131072)
        ms = d.copy_declare.arguments["x-message-ttl"]
        assert d.copy_to == f"default.wait.{ms}" and ms / 1000 < eta - now + 0.001  # never late by more than rounding to the ms
        now += ms / 1000  # the broker hands it back when its TTL runs out
        hops += 1
    assert eta <= now < eta + 0.002 and hops <= 8


def test_whatever_a_parser_raises_is_a_refusal_not_a_task_failure(registry, monkeypatch):
    """A parser's own bug on a forged value (as the OverflowError above was) dead-letters as a bad message."""
    def broken(*_a):
        raise TypeError("unsupported operand")

    monkeypatch.setattr(formats.dramatiq, "read", broken)
    monkeypatch.setattr(formats.celery, "read", broken)
    d = delivery(orjson.dumps({"actor_name": "app.add"}))
    with pytest.raises(BadMessage, match="dramatiq message cannot be read .TypeError"):
        resolve(d, registry)
    assert d.task == "app.add"
    d = delivery(orjson.dumps([[1], {}, EMBED]), "celery", celery_header())
    with pytest.raises(BadMessage, match="celery message cannot be read .TypeError"):
        resolve(d, registry)
    assert d.task == "app.cadd"


def test_a_queue_named_like_a_delay_queue_but_not_dramatiqs_keeps_its_copies(registry):
    """A dramatiq message in a queue `jobs.DQ` the worker consumes as its own (not one of --dramatiq-queues) waited
    and was retried into `jobs`, which this worker does not consume: it was stranded there."""
    d = delivery(orjson.dumps({"actor_name": "app.add", "options": {"eta": (NOW + 5) * 1000}}), "jobs.DQ")
    with pytest.raises(formats.NotDue) as info:
        resolve(d, registry)
    formats.defer(d, info.value.seconds, 131072)
    assert d.copy_to == "jobs.DQ.wait.5000" and d.meta.dead_to is None
    d = delivery(orjson.dumps({"actor_name": "app.add", "options": {"eta": (NOW + 5) * 1000}}), "default.DQ")
    with pytest.raises(formats.NotDue):
        resolve(d, registry)
    assert d.meta.home == "default" and d.meta.dead_to == "default.XQ"  # dramatiq's own .DQ: home is `default`


def test_dead_list_shows_a_foreign_messages_id():
    """`magne dead list <q>.XQ` showed "(no id)" for every dramatiq and celery dead letter."""
    body = orjson.dumps({"actor_name": "app.add", "message_id": "d-1"})
    assert dead.describe(commands.Basic.Properties(), body)["message_id"] == "d-1"
    celery_props = commands.Basic.Properties(correlation_id="c-2", headers={"id": "c-1", "task": "app.cadd"})
    assert dead.describe(celery_props, b"[[], {}, {}]")["message_id"] == "c-1"
    assert dead.describe(commands.Basic.Properties(correlation_id="c-2"), b"[]")["message_id"] == "c-2"
    assert dead.describe(commands.Basic.Properties(message_id="m"), body)["message_id"] == "m"  # magne's own first
    assert dead.describe(commands.Basic.Properties(), b'{"message_id": 5')["message_id"] is None
