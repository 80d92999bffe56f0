"""Names (issue 20): every task and queue name RabbitMQ accepts gets through; the rest is refused at @task time, and
magne.testing applies the same rule; a worker's connection name stays bounded whatever its queues."""

from __future__ import annotations

import uuid

import pytest
from pamqp import frame as pframe

from magne import task, topology, wire
from magne.errors import RegistryError
from magne.registry import REGISTRY
from magne.testing import worker

# Names RabbitMQ takes (queue and exchange names are UTF-8 strings of up to 255 bytes) that pamqp's validation
# refuses: non-ASCII letters, punctuation outside its regex, and names longer than its 127-character exchange limit.
ACCEPTED = ["send welcome", "envoyer_été", "名前を送る", "a;b|c*d~e", "x" * 200, "ü" * 110]


@pytest.fixture
def unregister():
    made: list[str] = []
    yield made
    for name in made:
        REGISTRY.pop(name, None)


def _noop(*_args: object) -> None:
    return None


@pytest.mark.parametrize("queue", ACCEPTED)
def test_every_name_rabbitmq_accepts_registers_and_its_declarations_encode(queue, unregister):
    name = f"names_{uuid.uuid4().hex[:8]}"
    t = task(name=name, queue=queue)(_noop)
    unregister.append(name)
    assert t.queue == queue
    for method, _reply in [*topology.declarations(queue), *topology.declarations(queue, "quorum")]:
        pframe.marshal(method, 1)  # today: ValueError("Invalid value for exchange") or "Max length exceeded"
    pframe.marshal(topology.declare_delay(queue, 2_000_000_000), 1)


@pytest.mark.parametrize("name", ["send welcome", "été", "Ärger über Öl", "t" * 200])
def test_a_task_named_like_that_gets_a_default_queue_that_encodes(name, unregister):
    t = task(name=name)(_noop)
    unregister.append(name)
    for method, _reply in topology.declarations(t.queue):
        pframe.marshal(method, 1)


@pytest.mark.parametrize(("queue", "why"), [
    ("", "empty"),
    ("amq.mine", "amq."),
    ("q" * 239, "bytes"),  # its delay queue `<queue>.wait.<ms>` (room kept for the longer `.delay.`) would pass 255 bytes
    ("é" * 120, "bytes"),  # 240 bytes of UTF-8 in 120 characters
    ("bad\ud800", "UTF-8"),  # a lone surrogate has no UTF-8 form
])
def test_names_rabbitmq_refuses_are_refused_at_task_time(queue, why, unregister):
    name = f"names_{uuid.uuid4().hex[:8]}"
    unregister.append(name)
    with pytest.raises(RegistryError, match=why):
        task(name=name, queue=queue)(_noop)
    assert name not in REGISTRY


def test_a_task_name_whose_upper_case_queue_is_too_long_is_refused(unregister):
    name = "ß" * 100  # 200 bytes; its queue "SS" * 100 is 200 bytes too, fine
    unregister.append(name)
    task(name=name)(_noop)
    longer = "ß" * 120  # upper() makes "SS" * 120: 240 bytes
    unregister.append(longer)
    with pytest.raises(RegistryError, match="bytes"):
        task(name=longer)(_noop)


def test_a_task_name_must_be_a_non_empty_string(unregister):
    with pytest.raises(RegistryError):
        task(name="")(_noop)


def test_magne_testing_applies_the_same_rule_to_what_it_is_given(unregister):
    name = f"names_{uuid.uuid4().hex[:8]}"
    t = task(name=name, queue="envoyer_été")(_noop)
    unregister.append(name)
    with worker(0) as w:
        t.send(1)
        w.join()
        assert w.succeeded(t)
        mid = wire.new_id()
        with pytest.raises(ValueError, match="amq."):
            w.publish("amq.direct", wire.encode(name, [1], None, mid), wire.properties_for(mid))
        assert not w.sent[1:]  # refused before anything was kept


# -- the connection name (magne.naming) -------------------------------------------------------------------------
def test_the_connection_name_of_a_thousand_queues_is_bounded():
    from magne.naming import MAX_CONNECTION_NAME, connection_name

    queues = [f"magne-test-queue-{i:04d}" for i in range(1000)]
    name = connection_name("magne worker", queues)
    assert len(name.encode()) <= MAX_CONNECTION_NAME < 1024
    assert name.startswith("magne worker [magne-test-queue-0000, ") and name.endswith(" more]")
    assert "and 9" in name  # "... and 9NN more"
    assert connection_name("magne worker", ["A", "B"]) == "magne worker [A, B]"  # short lists stay as they were


def test_the_connection_name_is_bounded_even_for_one_very_long_non_ascii_queue():
    from magne.naming import MAX_CONNECTION_NAME, connection_name

    name = connection_name("magne worker publisher", ["é" * 119, "名" * 79])
    assert len(name.encode()) <= MAX_CONNECTION_NAME
    name.encode("utf-8")  # never cut inside a character


def test_a_consumer_tag_stays_a_short_string_for_the_longest_queue_name():
    from magne.naming import consumer_tag

    longest = "é" * (topology.MAX_QUEUE_BYTES // 2)
    tag = consumer_tag(longest, 4194304, 12, 123456)
    assert len(tag.encode()) <= 255 and tag.startswith("magne.éé") and tag.endswith(".4194304.12.123456")
    assert consumer_tag("Q", 1, 2, 3) == "magne.Q.1.2.3"
