"""The publisher's window of confirms against the real broker: a nack and a return in the middle of a batch,
a connection cut mid-batch, many threads at once, asyncio, a fork, and an interrupted wait.

Every queue is unique to the test (magne-test-...) and deleted at the end by the `broker` fixture.
"""

from __future__ import annotations

import asyncio
import ctypes
import os
import subprocess
import sys
import threading
import time

import pytest
from pamqp import commands

from magne import wire
from magne.amqp.confirms import Nacked, Returned, Tracker
from magne.engine.sender import Sender
from magne.publisher import Message, NoSuchQueue, Publisher, Target
from support import URL, wait_for
from support.proxy import Proxy


def props(mid: str) -> commands.Basic.Properties:
    return wire.properties_for(mid)


def ids_in(broker, queue: str) -> list[str]:
    return [p.message_id for p, _ in broker.get_all(queue)]


def full_queue(broker, name: str) -> str:
    """A queue that refuses every further publish (basic.nack): reject-publish at its length limit of 1."""
    broker.track(name)
    broker.ch.queue_declare(name, durable=True, arguments={"x-max-length": 1, "x-overflow": "reject-publish"})
    broker.publish("", name, b"filler")
    return name


def test_a_nack_and_a_return_in_the_middle_of_a_batch_fail_exactly_those_messages(broker, names, pub):
    q = names["main"]
    full = full_queue(broker, f"{names['MAGNE_TEST_PREFIX']}.full")
    msgs = [Message(q, b"%d" % i, props(f"m{i}")) for i in range(300)]
    msgs[100] = Message(full, b"refused", props("nacked"), exchange="")  # the default exchange routes to it
    msgs[200] = Message("no-such-binding", b"lost", props("returned"), exchange="amq.direct")
    result = pub.publish_many(msgs)
    assert [(f.index, f.message_id, f.reason) for f in result.failed] == [(100, "nacked", "nack"),
                                                                         (200, "returned", "return")]
    assert isinstance(result.failed[0].error, Nacked) and isinstance(result.failed[1].error, Returned)
    assert result.sent == [f"m{i}" for i in range(300) if i not in (100, 200)]
    assert ids_in(broker, q) == result.sent  # in order, once each
    assert broker.ready(full) == 1


def test_a_single_send_that_is_nacked_or_returned_raises(broker, names, pub):
    full = full_queue(broker, f"{names['MAGNE_TEST_PREFIX']}.full")
    with pytest.raises(Nacked):
        pub.publish(full, b"x", props("n"), exchange="")
    with pytest.raises(Returned):
        pub.publish("no-such-binding", b"x", props("r"), exchange="amq.direct")
    pub.publish(names["main"], b"ok", props("ok"))  # the publisher goes on
    assert ids_in(broker, names["main"]) == ["ok"]


def test_send_many_to_a_queue_that_does_not_exist_fails_every_message_and_creates_nothing(broker, names, pub):
    q = f"{names['MAGNE_TEST_PREFIX']}.typo"
    broker.track(q)
    result = pub.send_many([(Target("record", q), [i]) for i in range(50)], declare=False)
    assert len(result.failed) == 50 and all(isinstance(f.error, NoSuchQueue) for f in result.failed)
    ok = pub.send_many([(Target("record", names["main"]), [i]) for i in range(5)])  # the channel was reopened
    assert ok.ok and ids_in(broker, names["main"]) == ok.sent


def test_a_connection_cut_mid_batch_republishes_and_never_reports_a_lost_message_as_sent(broker, names):
    q = names["main"]
    proxy = Proxy()
    pub = Publisher(proxy.url(), window=500)
    n = 20000
    cut_at: list[int] = []

    def cutter() -> None:
        wait_for(lambda: broker.ready(q) >= 3000, 60, interval=0.01, what="3000 messages in the queue")
        cut_at.append(broker.ready(q))
        proxy.cut()

    try:
        pub.send(Target("record", q), ["first"])  # declares the queue
        t = threading.Thread(target=cutter, daemon=True)
        t.start()
        result = pub.send_many((Target("record", q), [i]) for i in range(n))
        t.join(30)
    finally:
        pub.close()
        proxy.close()
    assert cut_at and cut_at[0] < n, "the cut did not land mid-batch"
    assert proxy.accepted >= 2, "the publisher did not reconnect"
    in_queue = ids_in(broker, q)
    assert len(result.message_ids) == n
    sent, failed = set(result.sent), {f.message_id for f in result.failed}
    assert not sent & failed and sent | failed == set(result.message_ids)  # each one reported, once
    assert sent <= set(in_queue), "a message reported as sent is not in the queue"
    assert not failed, f"{len(failed)} failed; a cut with the broker up should be survived: {result.failed[:3]}"
    # At least once: what was written before the cut may have been taken, and is then published again.
    assert len(set(in_queue)) == n + 1 and len(in_queue) >= n + 1


def test_a_broker_that_stays_away_fails_the_unconfirmed_messages_instead_of_dropping_them(broker, names, monkeypatch):
    import magne.engine.client as mc

    monkeypatch.setattr(mc, "GIVE_UP_AFTER", 1.0)
    q = names["main"]
    proxy = Proxy()
    pub = Publisher(proxy.url(), window=200)
    try:
        pub.send(Target("record", q), ["first"])
        proxy.stall()  # nothing goes through: the batch stays unconfirmed
        out: list = []
        t = threading.Thread(target=lambda: out.append(pub.send_many((Target("record", q), [i]) for i in range(500))))
        t.start()
        time.sleep(0.5)
        proxy.refuse()  # cut, and refuse every reconnect
        t.join(30)
    finally:
        pub.close()
        proxy.close()
    assert out, "send_many did not return"
    result = out[0]
    sent = set(result.sent)
    assert sent <= set(ids_in(broker, q))
    assert result.failed and all(f.reason == "error" for f in result.failed)
    assert len(sent) + len(result.failed) == 500


def test_many_threads_share_one_connection_and_have_their_confirms_in_flight_together(broker, names, monkeypatch):
    most, opened = [0], [0]
    add, open_ = Tracker.add, Sender._open

    def counting_add(self, token, key=None):
        most[0] = max(most[0], len(self) + 1)
        return add(self, token, key)

    def counting_open(self, now):
        opened[0] += 1
        return open_(self, now)

    monkeypatch.setattr(Tracker, "add", counting_add)
    monkeypatch.setattr(Sender, "_open", counting_open)
    pub = Publisher(URL)
    q, target = names["main"], Target("record", names["main"])
    pub.send(target, ["warm-up"])
    got: list[str] = []
    errors: list[BaseException] = []

    def sender(k: int) -> None:
        try:
            for i in range(100):
                got.append(pub.send(target, [k, i]))
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    try:
        threads = [threading.Thread(target=sender, args=(k,)) for k in range(16)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
    finally:
        pub.close()
    assert not errors, errors[:3]
    assert len(got) == 1600 and len(set(got)) == 1600
    assert sorted(ids_in(broker, q)[1:]) == sorted(got)
    assert opened[0] == 1, f"{opened[0]} connections for one publisher"
    assert most[0] > 1, "every send waited alone: no two confirms were ever in flight together"


def test_send_async_does_not_block_the_event_loop_and_completes_on_the_confirm(broker, names):
    q = names["main"]
    proxy = Proxy()
    pub = Publisher(proxy.url())
    target = Target("record", q)

    async def main() -> tuple[list[str], float]:
        await pub.send_async(target, ["warm-up"])
        proxy.stall()  # confirms cannot come: the sends wait, the loop must not
        sends = asyncio.gather(*[pub.send_async(target, [i]) for i in range(200)])
        gaps, last = [], time.monotonic()
        for _ in range(20):
            await asyncio.sleep(0.02)
            now = time.monotonic()
            gaps.append(now - last)
            last = now
        assert not sends.done()
        proxy.resume()
        ids = await asyncio.wait_for(sends, 30)
        return ids, max(gaps)

    try:
        ids, gap = asyncio.run(main())
    finally:
        pub.close()
        proxy.close()
    assert gap < 0.2, f"the event loop stalled for {gap:.3f}s"
    assert len(set(ids)) == 200 and set(ids) <= set(ids_in(broker, q))


def test_send_async_raises_the_nack(broker, names, pub):
    full = full_queue(broker, f"{names['MAGNE_TEST_PREFIX']}.full")
    broker.ch.exchange_declare(full, "direct", durable=True)  # the task's own exchange, bound to the full queue
    broker.ch.queue_bind(full, full, full)

    async def main() -> None:
        with pytest.raises(Nacked):
            await pub.send_async(Target("record", full), ["x"], declare=False)

    asyncio.run(main())


def test_a_publisher_used_before_fork_gives_the_child_its_own_connection(broker, names):
    q, target = names["main"], Target("record", names["main"])
    pub = Publisher(URL)
    try:
        pub.send(target, ["parent-before"])
        parent_port = pub._client.sender.conn.sock.getsockname()[1]
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:  # the child: report its own connection's port, or the error
            code = 1
            try:
                os.close(r)
                assert pub._client is None, "the child kept the parent's client"
                mid = pub.send(target, ["child"])
                port = pub._client.sender.conn.sock.getsockname()[1]
                os.write(w, f"{mid} {port}".encode())
                pub.close()
                code = 0
            except BaseException as exc:
                os.write(w, f"error {exc!r}".encode())
            finally:
                os._exit(code)
        os.close(w)
        _, status = os.waitpid(pid, 0)
        report = os.read(r, 4096).decode()
        os.close(r)
        assert status == 0, report
        child_mid, child_port = report.split()
        assert int(child_port) != parent_port, "the child published on the parent's socket"
        pub.send(target, ["parent-after"])  # the parent's connection survived the child's exit
        assert pub._client.sender.conn.sock.getsockname()[1] == parent_port
    finally:
        pub.close()
    got = ids_in(broker, q)
    assert len(got) == 3 and child_mid in got


def test_an_interrupted_send_leaves_no_confirm_for_the_next_send_to_take(broker, names):
    """A send waits on a stalled connection and is interrupted (as a time limit would); the next send goes
    to a full reject-publish queue. When the connection flows again, the broker acks the first message and
    nacks the second: the second must raise, not return on the first one's ack."""
    full = full_queue(broker, f"{names['MAGNE_TEST_PREFIX']}.full")
    q = names["main"]
    proxy = Proxy()
    pub = Publisher(proxy.url())
    outcome: dict[str, object] = {}

    def run(name: str, fn) -> threading.Thread:
        def body() -> None:
            try:
                outcome[name] = fn()
            except BaseException as exc:
                outcome[name] = exc

        t = threading.Thread(target=body, daemon=True)
        t.start()
        return t

    try:
        pub.publish(q, b"warm-up", props("w"))
        proxy.stall()
        first = run("first", lambda: pub.publish(q, b"first", props("first")))
        time.sleep(0.3)
        assert first.is_alive()
        n = ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(first.ident), ctypes.py_object(KeyboardInterrupt))
        assert n == 1
        first.join(3)
        assert not first.is_alive() and isinstance(outcome["first"], KeyboardInterrupt)
        second = run("second", lambda: pub.publish(full, b"refused", props("second"), exchange=""))
        time.sleep(0.3)
        proxy.resume()
        second.join(30)
    finally:
        pub.close()
        proxy.close()
    assert isinstance(outcome["second"], Nacked), outcome["second"]
    assert ids_in(broker, q) == ["w", "first"]  # the interrupted send's message still went, once


def test_magne_send_count_publishes_them_all_confirmed(broker, names):
    q = names["main"]
    out = subprocess.run([sys.executable, "-m", "magne", "send", "record", "--args", '["cli"]', "--count", "500",
                          "--declare", "--queue", q], capture_output=True, text=True, timeout=120,
                         env={**os.environ, "MAGNE_URL": URL})
    assert out.returncode == 0, out.stderr
    printed = out.stdout.split()
    assert len(printed) == 500 and len(set(printed)) == 500
    assert ids_in(broker, q) == printed


def test_a_batch_whose_arguments_stop_being_json_reports_what_went_before(broker, names, pub):
    q, target = names["main"], Target("record", names["main"])
    items = [(target, [i]) for i in range(100)] + [(target, [object()])] + [(target, [i]) for i in range(5)]
    with pytest.raises(TypeError) as info:
        pub.send_many(items)
    partial = info.value.partial
    assert partial.ok and len(partial.sent) == 100
    assert ids_in(broker, q) == partial.sent
