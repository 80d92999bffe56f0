"""The foreign-format parsers (magne.formats): dramatiq's and celery's messages, validated field by field."""

from __future__ import annotations

import json
import time
import types

import orjson
import pytest
from dramatiq.brokers.rabbitmq import RabbitmqBroker
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pamqp import commands

from magne import formats, task
from magne.amqp import codec
from magne.cli import build_parser
from magne.delivery import Delivery, Outcome
from magne.errors import BadMessage
from magne.formats import dramatiq as fdramatiq
from magne.policy import Failure, RetryPolicy, decide
from magne.registry import REGISTRY
from magne.runner import Runner
from magne.supervisor import Supervisor
from magne.taskrun import TaskRun
from magne.testing import worker
from magne.worker import Options

BOTH = formats.Accept(frozenset({"dramatiq", "celery"}), frozenset({"default"}))
NOW = 1_800_000_000.0


@pytest.fixture
def tasks():
    saved = dict(REGISTRY)
    REGISTRY.clear()
    seen: list = []

    @task(name="app.add", queue="default")
    def add(a, b=0):
        seen.append(a + b)
        return None

    @task(name="app.boom", queue="default", max_retries=3, min_backoff=1, max_backoff=1)
    def boom():
        raise ValueError("boom")

    @task(name="app.cadd", queue="celery")
    def cadd(a, b=0):
        seen.append(a + b)

    yield types.SimpleNamespace(registry=dict(REGISTRY), seen=seen)
    REGISTRY.clear()
    REGISTRY.update(saved)


def dram(actor="app.add", args=(1, 2), kwargs=None, options=None, queue="default", **extra) -> bytes:
    return orjson.dumps({"queue_name": queue, "actor_name": actor, "args": list(args), "kwargs": kwargs or {},
                         "options": options or {}, "message_id": "m-1", "message_timestamp": 1, **extra})


def celery_header(headers=None, content_type="application/json", **props) -> bytes:
    h = {"lang": "py", "task": "app.cadd", "id": "c-1", "retries": 0, "timelimit": [None, None], "eta": None,
         "expires": None, **(headers or {})}
    return codec.header_payload(commands.Basic.Properties(content_type=content_type, content_encoding="utf-8",
                                                          correlation_id="c-1", headers=h, **props), 10)


EMBED = {"callbacks": None, "errbacks": None, "chain": None, "chord": None}


def delivery(body: bytes, queue="default", header: bytes | None = None) -> Delivery:
    header = header if header is not None else codec.header_payload(commands.Basic.Properties(delivery_mode=2),
                                                                    len(body))
    return Delivery(1, 1, queue, body, header, False)


def resolve(d: Delivery, registry, accept=BOTH, now=NOW):
    return formats.resolve(d, registry, formats.Accept(accept.formats, accept.dramatiq_queues, lambda: now))


# -- dramatiq -----------------------------------------------------------------------------------------------

def test_dramatiq_message_resolves_with_its_id_retries_and_time_limit(tasks):
    d = delivery(dram(args=[1], kwargs={"b": 5}, options={"retries": 2, "time_limit": 1500}))
    t, args, kwargs = resolve(d, tasks.registry)
    assert (t.name, args, kwargs) == ("app.add", [1], {"b": 5})
    assert t.time_limit == 1.5 and tasks.registry["app.add"].time_limit is None  # a copy: the task is untouched
    assert d.meta.retries == 2 and d.meta.dead_to == "default.XQ" and d.message_id() == "m-1"


def test_a_message_time_limit_shortens_the_tasks_never_lengthens_it(tasks):
    long = delivery(dram(options={"time_limit": 3_600_000}))
    assert resolve(long, tasks.registry)[0] is tasks.registry["app.add"]  # over the worker's 600 s: not taken
    hdr = celery_header({"timelimit": [7200, None]})
    assert resolve(delivery(orjson.dumps([[1], {}, EMBED]), "celery", hdr), tasks.registry)[0].time_limit is None


@pytest.mark.parametrize(("change", "field"), [
    ({"actor_name": 3}, "actor_name"), ({"args": {}}, "args"), ({"kwargs": [1]}, "kwargs"),
    ({"options": "x"}, "options"), ({"message_id": 5}, "message_id"), ({"queue_name": 1}, "queue_name"),
    ({"options": {"eta": True}}, "options.eta"), ({"options": {"retries": 2.0}}, "options.retries"),
    ({"options": {"time_limit": -1}}, "options.time_limit"), ({"options": {"pipe_target": {}}}, "options.pipe_target"),
    ({"options": {"on_success": "x"}}, "options.on_success"),
    ({"options": {"group_completion_uuid": "u"}}, "options.group_completion_uuid"),
])
def test_dramatiq_refusals_name_the_field(tasks, change, field):
    msg = orjson.loads(dram())
    msg.update(change)
    d = delivery(orjson.dumps(msg))
    with pytest.raises(BadMessage, match=f"'{field}'") as info:
        resolve(d, tasks.registry)
    runner = Runner(tasks.registry, lambda d: None)
    runner.accept = BOTH
    runner.fail(d, Failure("bad message", info.value, retryable=False))
    assert d.outcome is Outcome.DEAD and d.copy_to == "default.XQ"  # refused in dramatiq's queue: to its .XQ too


def test_delayed_dramatiq_message_is_not_due_then_runs(tasks):
    eta_ms = int((NOW + 30) * 1000)
    d = delivery(dram(options={"eta": eta_ms}, queue="default.DQ"), queue="default.DQ")
    with pytest.raises(formats.NotDue) as info:
        resolve(d, tasks.registry)
    assert 29.9 < info.value.seconds <= 30
    formats.defer(d, info.value.seconds, 131072)
    assert d.outcome is Outcome.RETRY and d.reason == "not due"
    assert d.copy_to == "default.wait.30000"  # magne's wait queue of the home queue, not of .DQ
    assert d.copy_declare.arguments["x-dead-letter-routing-key"] == "default.due"
    assert resolve(delivery(d.body, "default"), tasks.registry, now=NOW + 30)[0].name == "app.add"


def test_a_deferred_message_keeps_its_header_and_retries(tasks):
    header = codec.header_payload(commands.Basic.Properties(delivery_mode=2, headers={"x-magne-retries": 2}), 10)
    d = delivery(dram(options={"eta": int((NOW + 5) * 1000)}), header=header)
    with pytest.raises(formats.NotDue) as info:
        resolve(d, tasks.registry)
    formats.defer(d, info.value.seconds, 131072)
    assert d.copy_header == header


def test_formats_not_accepted_say_how_to_accept_them(tasks):
    only_celery = formats.Accept(frozenset({"celery"}))
    with pytest.raises(BadMessage, match="--accept dramatiq"):
        resolve(delivery(dram()), tasks.registry, only_celery)
    with pytest.raises(BadMessage, match="--accept celery"):
        resolve(delivery(orjson.dumps([[1], {}, EMBED])), tasks.registry, formats.Accept(frozenset({"dramatiq"})))


def test_magne_format_still_runs_and_fails_into_dramatiqs_xq(tasks):
    d = delivery(orjson.dumps({"func": "app.boom", "args": []}))
    t, args, kwargs = resolve(d, tasks.registry)
    assert t.name == "app.boom" and d.meta is None  # the success path pays nothing more
    runner = Runner(tasks.registry, lambda d: None)
    runner.accept = BOTH
    runner.fail(d, Failure("task raised", ValueError("x"), retryable=False))
    assert d.outcome is Outcome.DEAD and d.copy_to == "default.XQ"
    plain = delivery(orjson.dumps({"func": "app.add", "args": [1]}), queue="celery")
    resolve(plain, tasks.registry)
    assert plain.meta is None  # not a dramatiq queue: nothing more than without --accept


def test_retries_spent_count_against_the_policy_and_retries_go_home(tasks):
    d = delivery(dram("app.boom", args=[], options={"retries": 2}), queue="default.DQ")
    resolve(d, tasks.registry)
    decide(d, Failure("task raised", ValueError("x")), RetryPolicy(max_retries=3), 131072)
    assert d.outcome is Outcome.RETRY and d.copy_to.startswith("default.wait.")  # one retry left, into `default`
    assert codec.decode_properties(d.copy_header).headers["x-magne-retries"] == 3
    d = delivery(dram("app.boom", args=[], options={"retries": 3}))
    resolve(d, tasks.registry)
    decide(d, Failure("task raised", ValueError("x")), RetryPolicy(max_retries=3), 131072)
    assert d.outcome is Outcome.DEAD and d.copy_to == "default.XQ"
    assert d.copy_declare.arguments == {"x-message-ttl": 7 * 86400000}


def test_declarations_are_dramatiqs_own():
    """The arguments are those dramatiq's broker computes (its own code, called here), so neither side gets a 406."""
    for prio in (None, 10):
        theirs = RabbitmqBroker._build_queue_arguments(types.SimpleNamespace(max_priority=prio), "default")
        decls = {m.queue: m.arguments for m, _r in fdramatiq.declarations("default", prio) if hasattr(m, "queue")
                 and type(m).__name__.endswith("Declare")}
        assert decls["default"] == theirs and decls["default.DQ"] == theirs
        assert decls["default.XQ"] == {"x-message-ttl": 86400000 * 7}


# -- celery -------------------------------------------------------------------------------------------------

def test_celery_message_resolves_with_eta_expires_timelimit(tasks):
    hdr = celery_header({"retries": 1, "timelimit": [10, 2], "eta": "2027-02-01T08:00:00+00:00",
                         "expires": "2027-02-01T09:00:00"})
    d = delivery(orjson.dumps([[1], {"b": 2}, EMBED]), "celery", hdr)
    with pytest.raises(formats.NotDue):
        resolve(d, tasks.registry)
    f = d.meta
    assert (f.task, f.args, f.kwargs, f.message_id, f.retries) == ("app.cadd", [1], {"b": 2}, "c-1", 1)
    assert f.time_limit == 2  # [hard, soft]: the soft one
    assert f.expires - f.eta == 3600 and f.dead_to is None  # naive means UTC; failures go to magne's .dead
    t, _a, _k = resolve(delivery(d.body, "celery", hdr), tasks.registry, now=f.eta + 1)
    assert t.time_limit == 2
    with pytest.raises(formats.Expired, match="expires"):
        resolve(delivery(d.body, "celery", hdr), tasks.registry, now=f.expires + 1)


@pytest.mark.parametrize(("headers", "body", "props", "field"), [
    ({"task": None}, [[], {}, EMBED], {}, "task"),
    ({"timelimit": [1]}, [[], {}, EMBED], {}, "timelimit"),
    ({"eta": "tomorrow"}, [[], {}, EMBED], {}, "eta"),
    ({}, [[], {}, {**EMBED, "callbacks": [{"task": "x"}]}], {}, "embed.callbacks"),
    ({}, [[], {}, {**EMBED, "errbacks": [{"task": "x"}]}], {}, "embed.errbacks"),
    ({}, [[], {}, {**EMBED, "chain": [{"task": "x"}]}], {}, "embed.chain"),
    ({}, [[], {}, EMBED], {"content_type": "application/x-msgpack"}, "content_type"),
    ({"compression": "application/x-gzip"}, [[], {}, EMBED], {}, "compression"),
    ({}, [[], [], EMBED], {}, "body[1] (kwargs)"),
])
def test_celery_refusals_name_the_field(tasks, headers, body, props, field):
    d = delivery(orjson.dumps(body), "celery", celery_header(headers, **props))
    with pytest.raises(BadMessage, match=field.replace("[", r"\[").replace("(", r"\(").replace(")", r"\)")):
        resolve(d, tasks.registry)


def test_celery_pickle_is_refused_by_its_content_type_not_its_bytes(tasks):
    hdr = codec.header_payload(commands.Basic.Properties(content_type="application/x-python-serialize",
                                                         content_encoding="binary", headers={"task": "app.cadd"}), 5)
    with pytest.raises(BadMessage, match="content_type"):
        resolve(delivery(b"\x80\x04\x95..", "celery", hdr), tasks.registry)


def test_celery_protocol_1_is_refused_with_the_setting_to_change(tasks):
    with pytest.raises(BadMessage, match="protocol 1"):
        resolve(delivery(orjson.dumps({"task": "app.cadd", "id": "x", "args": []}), "celery"), tasks.registry)


# -- anything a producer can forge -------------------------------------------------------------------------

json_values = st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False)
                           | st.text(max_size=20), lambda c: st.lists(c, max_size=4) | st.dictionaries(
                               st.text(max_size=10), c, max_size=4), max_leaves=8)
dram_keys = st.sampled_from(["queue_name", "actor_name", "args", "kwargs", "options", "message_id", "eta", "retries",
                             "time_limit", "pipe_target"])


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.dictionaries(dram_keys, json_values), st.dictionaries(dram_keys, json_values))
def test_forged_dramatiq_messages_only_ever_raise_bad_message(tasks, top, options):
    msg = {"actor_name": "app.add", **top, "options": options}
    d = delivery(json.dumps(msg).encode())  # the standard library: integers of any size, as a producer may write
    try:
        resolve(d, tasks.registry)
    except (BadMessage, formats.NotDue):
        pass
    f = d.meta
    assert f is None or (type(f.retries) is int and (f.eta is None or type(f.eta) is float))


celery_keys = st.sampled_from(["task", "id", "eta", "expires", "retries", "timelimit", "compression"])
header_values = st.recursive(st.none() | st.booleans() | st.integers(-2**63, 2**63 - 1) | st.text(max_size=30),
                             lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=5), c, max_size=3),
                             max_leaves=10)


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.dictionaries(celery_keys, header_values), json_values)
def test_forged_celery_messages_only_ever_raise_bad_message(tasks, headers, body):
    d = delivery(json.dumps(body if isinstance(body, list) else [body]).encode(), "celery", celery_header(headers))
    try:
        resolve(d, tasks.registry)
    except (BadMessage, formats.NotDue):
        pass


# -- the worker's options and magne.testing ----------------------------------------------------------------

def test_plan_checks_the_options():
    assert formats.plan(["dramatiq,celery"], None, ["a", "b"]).dramatiq_queues == {"a", "b"}
    assert formats.plan(["celery", "magne"], None, ["a"]) == formats.Accept(frozenset({"celery"}))
    for accept, dq, why in ((["rq"], None, "unknown format"), (["celery"], ["a"], "needs --accept dramatiq"),
                            (["dramatiq"], ["zz"], "does not consume"), (["dramatiq"], ["a.DQ"], "own name")):
        with pytest.raises(ValueError, match=why):
            formats.plan(accept, dq, ["a", "a.DQ"] if dq == ["a.DQ"] else ["a"])


def test_magne_testing_replays_captured_messages_on_its_clock(tasks):
    eta_ms = int((time.time() + 3600) * 1000)
    with worker(accept="dramatiq,celery") as w:
        props = commands.Basic.Properties(delivery_mode=2)
        w.publish("default", dram(args=[1, 2]), props)
        w.publish("default.DQ", dram(args=[10, 20], options={"eta": eta_ms}, queue="default.DQ"), props)
        w.publish("default", dram("app.boom", args=[], options={"retries": 2}), props)
        w.publish("celery", orjson.dumps([[3], {"b": 4}, EMBED]), celery_header({"id": "c-9"}))
        w.join()
        assert sorted(tasks.seen) == [3, 7, 30]
        late = [r for r in w.succeeded("app.add") if r.args == [10, 20]]
        # it waited for its eta on the simulated clock (whose 0.0 is the worker's start, a moment after `eta_ms`
        # was computed: the eta falls a few ms before 3600 on it)
        assert len(late) == 1 and 3599 <= late[0].at <= 3600 * 1.1
        assert [r.message_id for r in w.succeeded("app.cadd")] == ["c-9"]
        [dead] = w.dead_letters("app.boom")
        assert dead.retries == 3 and len(w.retried) == 1  # 2 spent by the old workers, 1 here, then dead


def test_worker_processes_under_a_supervisor_get_the_same_accept():
    opts = Options(modules=["m"], accept=["dramatiq", "celery"], dramatiq_queues=["default"])
    argv = Supervisor(opts, 2).child_argv()
    args = build_parser().parse_args(argv[argv.index("magne") + 1:])
    assert args.accept == ["dramatiq", "celery"] and args.dramatiq_queues == ["default"]


def test_hooks_see_a_foreign_messages_id_and_retries(tasks):
    d = delivery(dram(options={"retries": 2}))
    t, args, kwargs = resolve(d, tasks.registry)
    run = TaskRun(t, d, args, kwargs)
    assert (run.message_id, run.retries) == ("m-1", 2)
