"""Issue 20, "Sends that fail because of someone else" and "Memory": regression tests of the sending side.

Each test states a contract of the public API (magne.Publisher, task.send, send_many, send_async,
magne.configure, magne.hooks) against the real broker. They were written before the publisher's rewrite (each failed on the code
before it, as the issue describes) and go only through public API, so they survive rewrites.

Every queue is under the test's own prefix (the `names` fixture) and deleted at the end.
"""

from __future__ import annotations

import asyncio
import math
import os
import sys
import threading
import time
import tracemalloc
import uuid
from collections.abc import Iterator
from typing import Any

import pika
import pytest

import magne
from magne import hooks
from support import URL, rabbitmqctl, wait_for
from support.proxy import Proxy


def _noop(*args: Any) -> None:
    """The body of the tasks made here: these tests only send."""


def a_task(queue: str, queue_type: str | None = None) -> magne.Task:
    """A task of its own (a unique name) on `queue`, for sending."""
    return magne.task(name=f"send_{uuid.uuid4().hex[:12]}", queue=queue, queue_type=queue_type)(_noop)


def is_refusal(exc: BaseException) -> bool:
    """What a send refused for a declaration may raise: PublishError, or NoSuchQueue for a missing queue."""
    return isinstance(exc, magne.PublishError) or type(exc).__name__ == "NoSuchQueue"


def messages_in(broker: Any, queue: str) -> int:
    """Ready messages in `queue`, 0 when it does not exist (a passive declare that fails closes pika's channel)."""
    try:
        return broker.ready(queue)
    except pika.exceptions.ChannelClosedByBroker:
        broker.reopen()
        return 0


def queues_with_prefix(prefix: str) -> dict[str, int]:
    out = {}
    for line in rabbitmqctl("list_queues", "name", "messages").splitlines():
        parts = line.split("\t")
        if len(parts) == 2 and parts[0].startswith(prefix):
            out[parts[0]] = int(parts[1])
    return out


@pytest.fixture
def proxy() -> Iterator[Proxy]:
    p = Proxy()
    yield p
    p.close()


@pytest.fixture
def hook() -> Iterator[Any]:
    """Register a before_send hook for one test (the hooks registry is process-wide): hook(fn)."""
    added: list[hooks.Hook] = []

    def add(fn: Any) -> hooks.Hook:
        class OneHook(hooks.Hook):
            def before_send(self, message: hooks.Outgoing) -> None:
                fn(message)

        h = hooks.add(OneHook())
        added.append(h)
        return h

    yield add
    for h in added:
        hooks.remove(h)


@pytest.fixture
def vhost() -> Iterator[dict[str, str]]:
    """A vhost and a user of this test's own, full permissions on it (tests narrow them); both removed at the end."""
    tag = uuid.uuid4().hex[:10]
    v = {"vhost": f"magne-test-vh-{tag}", "user": f"magne-test-user-{tag}", "password": f"pw-{tag}"}
    rabbitmqctl("add_vhost", v["vhost"])
    rabbitmqctl("add_user", v["user"], v["password"])
    rabbitmqctl("set_permissions", "-p", v["vhost"], v["user"], ".*", ".*", ".*")
    v["url"] = f"amqp://{v['user']}:{v['password']}@127.0.0.1:5672/{v['vhost']}"
    yield v
    for args in (("delete_vhost", v["vhost"]), ("delete_user", v["user"])):
        try:
            rabbitmqctl(*args)
        except RuntimeError:
            pass  # the test deleted it already


# -- A: one refused declaration must not fail other threads' healthy messages --------------------------
def test_refused_declarations_in_other_threads_fail_only_their_own_messages(broker, names, pub):
    p = names["MAGNE_TEST_PREFIX"]
    healthy, quorum, missing = f"{p}.healthy", f"{p}.quorum", f"{p}.missing"
    broker.track(healthy, quorum, missing)
    pub.send(a_task(quorum, "quorum"), (0,))  # quorum exists as a quorum queue; `missing` does not exist
    to_healthy, as_classic, to_missing = a_task(healthy), a_task(quorum, "classic"), a_task(missing)
    done = threading.Event()
    outcomes: dict[str, list[Any]] = {"missing": [], "mismatch": []}

    def refused(kind: str, task: magne.Task, declare: bool) -> None:
        while not done.is_set():
            try:
                outcomes[kind].append(pub.send(task, (1,), declare=declare))
            except Exception as exc:
                outcomes[kind].append(exc)
            time.sleep(0.02)

    threads = [threading.Thread(target=refused, args=("missing", to_missing, False), daemon=True),
               threading.Thread(target=refused, args=("mismatch", as_classic, True), daemon=True)]
    for t in threads:
        t.start()
    try:
        n = 20_000
        result = pub.send_many((to_healthy, (i,)) for i in range(n))
    finally:
        done.set()
        for t in threads:
            t.join(60)
    assert not result.failed, (f"{len(result.failed)} healthy messages reported failed, the first: "
                               f"{result.failed[0].error!r}")
    assert len(result.sent) == n
    assert messages_in(broker, healthy) == n  # exactly: no duplicate from republishing
    for kind, got in outcomes.items():
        assert len(got) >= 2, f"the {kind} sender did not overlap the batch"
        sent = [x for x in got if isinstance(x, str)]
        assert not sent, f"{kind}: {len(sent)} sends needing a refused declaration were reported sent"
        wrong = [x for x in got if not is_refusal(x)]
        assert not wrong, f"{kind}: refused with {wrong[0]!r}, not NoSuchQueue or PublishError"
    assert messages_in(broker, missing) == 0


# -- B: every failure to send is a PublishError (or a ValueError before anything is sent) -------------------
@pytest.mark.parametrize("delay", [math.nan, -1.0, math.inf], ids=["nan", "negative", "infinite"])
def test_a_delay_that_can_never_be_sent_is_a_value_error_and_sends_nothing(broker, names, pub, delay):
    q = names["main"]
    with pytest.raises(ValueError):
        pub.send(a_task(q), (1,), delay=delay)
    assert sum(queues_with_prefix(names["MAGNE_TEST_PREFIX"]).values()) == 0, "something was sent"


def test_a_ten_year_delay_is_taken_or_refused_up_front_with_the_maximum(broker, names, pub):
    q = names["main"]
    try:
        pub.send(a_task(q), (1,), delay=10 * 365 * 86400)
    except ValueError as exc:
        assert "max" in str(exc).lower(), f"the error does not say the longest delay: {exc}"
        assert sum(queues_with_prefix(names["MAGNE_TEST_PREFIX"]).values()) == 0, "something was sent"
    else:
        assert sum(queues_with_prefix(names["MAGNE_TEST_PREFIX"]).values()) == 1  # waiting on the broker


def test_a_send_refused_by_permissions_raises_publish_error(vhost, names):
    rabbitmqctl("set_permissions", "-p", vhost["vhost"], vhost["user"], ".*", "^$", ".*")  # may not write
    p = magne.Publisher(vhost["url"], confirm_timeout=10)
    try:
        with pytest.raises(magne.PublishError):
            p.send(a_task(names["main"]), (1,))
    finally:
        p.close()


def test_a_send_after_the_vhost_was_deleted_raises_publish_error(vhost, names):
    p = magne.Publisher(vhost["url"], confirm_timeout=10)
    task = a_task(names["main"])
    try:
        p.send(task, (1,))
        rabbitmqctl("delete_vhost", vhost["vhost"])
        with pytest.raises(magne.PublishError):
            p.send(task, (2,))
    finally:
        p.close()


def test_a_send_to_an_unreachable_broker_raises_publish_error(names):
    p = magne.Publisher("amqp://guest:guest@127.0.0.1:1/%2F?connection_timeout=2000", confirm_timeout=5)
    try:
        with pytest.raises(magne.PublishError):
            p.send(a_task(names["main"]), (1,))
    finally:
        p.close()


# -- C: a long-lived sender re-declares a queue deleted under it ----------------------------------------
@pytest.mark.parametrize("exchange_too", [False, True], ids=["queue", "queue-and-exchange"])
def test_a_queue_deleted_under_a_long_lived_sender_is_declared_again(broker, names, pub, exchange_too):
    q = names["main"]
    task = a_task(q)
    pub.send(task, (1,))
    assert broker.get_all(q)
    broker.ch.queue_delete(q)
    if exchange_too:
        broker.ch.exchange_delete(q)
    for i in range(3):  # every later send declares again, as send() does by default
        pub.send(task, (2 + i,))
    assert messages_in(broker, q) == 3


# -- D: configure() never blocks other threads' sends while the old publisher drains ---------------------
def test_configure_does_not_block_sends_of_other_threads(broker, names, proxy):
    task = a_task(names["main"])
    threads: list[threading.Thread] = []
    out: dict[str, Any] = {}

    def run(name: str, fn: Any) -> None:
        def body() -> None:
            try:
                out[name] = fn()
            except BaseException as exc:
                out[name] = exc
        t = threading.Thread(target=body, daemon=True, name=name)
        threads.append(t)
        t.start()

    try:
        magne.configure(proxy.url())
        task.send(0)  # the old default publisher is connected, through the proxy
        proxy.stall()
        run("unconfirmed", lambda: task.send(1))  # waits for a confirm that cannot come
        time.sleep(0.3)  # let it reach the wire (nothing to wait on: the proxy swallows it)
        run("configure", lambda: magne.configure(URL))
        time.sleep(0.5)  # let configure() start closing the old publisher (nothing to observe from outside)
        started = time.monotonic()
        run("healthy", lambda: task.send(2))  # the new default publisher: a healthy broker
        wait_for(lambda: "healthy" in out, 5, what="a send from another thread during configure()")
        took = time.monotonic() - started
        assert isinstance(out["healthy"], str), out["healthy"]
        assert took < 2.0, f"task.send() took {took:.1f}s while configure() drained the old publisher"
    finally:
        proxy.close()  # the old publisher's connection dies: what it waits for fails soon
        deadline = time.monotonic() + 60
        for t in threads:
            t.join(max(0.0, deadline - time.monotonic()))
        magne.configure(URL)


# -- E: one fault, distinct exception objects --------------------------------------------------------
def test_threads_failed_by_one_fault_get_exceptions_of_their_own(names, proxy):
    task = a_task(names["main"])
    p = magne.Publisher(proxy.url("?connection_timeout=2000"), confirm_timeout=10)
    proxy.stall()  # the handshake cannot finish: every queued send fails when the connect times out
    errors: list[BaseException | None] = [None] * 8
    barrier = threading.Barrier(8)

    def send(i: int) -> None:
        barrier.wait()
        try:
            p.send(task, (i,))
        except BaseException as exc:
            errors[i] = exc

    threads = [threading.Thread(target=send, args=(i,), daemon=True) for i in range(8)]
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
        assert all(isinstance(e, magne.MagneError) for e in errors), errors
        assert len({id(e) for e in errors}) == 8, (f"8 failed sends share {len({id(e) for e in errors})} exception "
                                                   f"object(s): {errors[0]!r}")
    finally:
        proxy.close()
        p.close()


# -- F: a fresh publisher sends properties up to the broker's frame_max ---------------------------------
def test_the_first_send_of_a_fresh_publisher_takes_20_kib_of_headers(broker, names, hook):
    q = names["main"]
    big = "x" * 20_000
    hook(lambda m: m.headers.__setitem__("big", big))
    p = magne.Publisher(URL)
    try:
        p.send(a_task(q), (1,))  # the first send of this publisher, before it ever connected
    finally:
        p.close()
    [(props, _body)] = broker.get_all(q)
    assert props.headers["big"] == big


# -- G: a hook's unencodable header never breaks sending ---------------------------------------------------
@pytest.mark.parametrize("value", [object(), {1, 2}], ids=["object", "set"])
def test_a_header_amqp_cannot_encode_is_left_out_and_the_send_succeeds(broker, names, pub, hook, value):
    q = names["main"]

    def add(m: hooks.Outgoing) -> None:
        m.headers["bad"] = value
        m.headers["good"] = "kept"
    hook(add)
    mid = pub.send(a_task(q), (1,))
    [(props, _body)] = broker.get_all(q)
    assert props.message_id == mid
    assert props.headers.get("good") == "kept"
    assert "bad" not in props.headers


# -- L: send_async has backpressure ---------------------------------------------------------------------
def _magne_bytes(before: tracemalloc.Snapshot, after: tracemalloc.Snapshot) -> int:
    """Growth of the memory allocated by magne's own code between two snapshots (the test's tasks, futures
    and coroutines excluded: only what magne keeps)."""
    only = [tracemalloc.Filter(True, os.path.join(os.path.dirname(magne.__file__), "*"))]
    stats = after.filter_traces(only).compare_to(before.filter_traces(only), "filename")
    return sum(s.size_diff for s in stats)


@pytest.mark.slow
def test_send_async_to_a_stalled_broker_keeps_memory_bounded(broker, names, proxy):
    q = names["main"]
    task = a_task(q)
    n = 100_000
    # 1 KB bodies: encoded eagerly, even without duplicate parts, 100,000 of them exceed the bound (about 100 MiB);
    # waiting for room (about two windows) keeps a few MiB.
    payload = "x" * 1000
    p = magne.Publisher(proxy.url(), confirm_timeout=600)

    async def main() -> None:
        await p.send_async(task, (-1,))  # connected
        proxy.stall()
        started = 0

        async def one(i: int) -> str:
            nonlocal started
            started += 1
            return await p.send_async(task, (i, payload))

        tracemalloc.start()
        try:
            before = tracemalloc.take_snapshot()
            pending = [asyncio.ensure_future(one(i)) for i in range(n)]
            while started < n:
                await asyncio.sleep(0.05)
            await asyncio.sleep(1.0)  # let whatever the I/O thread takes be taken
            grown = _magne_bytes(before, tracemalloc.take_snapshot())
        finally:
            tracemalloc.stop()
        try:
            assert grown < 64 << 20, f"{n} send_async calls waiting on a stalled broker hold {grown >> 20} MiB in magne"
            proxy.resume()  # the extra awaits waited for room: now every one of them completes
            ids = await asyncio.wait_for(asyncio.gather(*pending), 240)
            assert len(set(ids)) == n
        finally:
            for f in pending:
                f.cancel()
            await asyncio.gather(*pending, return_exceptions=True)

    try:
        asyncio.run(main())
    finally:
        proxy.close()
        p.close()
    assert messages_in(broker, q) == n + 1


# -- M: send_many holds at most about two windows ---------------------------------------------------------
def test_send_many_of_100k_messages_keeps_memory_bounded(broker, names, pub):
    q = names["main"]
    task = a_task(q)
    pub.send(task, (-1,))  # connected and declared: the batch's own memory only
    n = 100_000
    tracemalloc.start()
    try:
        result = pub.send_many((task, (i,)) for i in range(n))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert not result.failed
    # The result itself (n message ids, about 8.5 MiB) is the caller's: what the batch held beyond it is bounded.
    own = sys.getsizeof(result.message_ids) + sum(sys.getsizeof(m) for m in result.message_ids)
    assert peak - own < 12 << 20, (f"send_many of {n} small messages peaked at {peak / 2**20:.1f} MiB, "
                                   f"its result {own / 2**20:.1f} MiB of it")
    assert messages_in(broker, q) == n + 1
