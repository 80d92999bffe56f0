"""Priorities: the hand-made header against pamqp, the queue argument only when asked, bad values refused."""

from __future__ import annotations

import pytest
from pamqp import commands

from magne import publisher, topology, wire
from magne.amqp import codec
from magne.errors import RegistryError
from magne.registry import task


@pytest.mark.parametrize("priority", [None, 0, 5, 255])
def test_json_header_with_priority_is_pamqps(priority):
    props = wire.properties_for("m-1")
    props.priority = priority
    assert publisher.json_header("m-1", 42, priority) == codec.header_payload(props, 42)


def test_x_max_priority_only_when_asked_and_never_on_dead_letters():
    assert topology.queue_arguments("Q") == {}
    assert topology.queue_arguments("Q", max_priority=10) == {"x-max-priority": 10}
    assert topology.queue_arguments("Q", dead=True, max_priority=10) == {}
    decl = topology.declarations("Q", "classic", 10)[1][0]
    assert isinstance(decl, commands.Queue.Declare) and decl.arguments == {"x-max-priority": 10}


@pytest.mark.parametrize("kwargs", [{"priority": 256}, {"priority": -1}, {"max_priority": 0}, {"priority": 1.5},
                                    {"max_priority": 5, "queue_type": "quorum"}])
def test_bad_priorities_are_refused_at_import(kwargs):
    with pytest.raises(RegistryError):
        task(name=f"prio_{abs(hash(str(kwargs)))}", **kwargs)(lambda: None)


def test_send_with_options_checks_its_priority():
    t = task(name="prio_ok", max_priority=10, priority=3)(lambda: None)
    assert (t.priority, t.max_priority) == (3, 10)
    with pytest.raises(ValueError, match="priority"):
        t.send_with_options(priority=300)
