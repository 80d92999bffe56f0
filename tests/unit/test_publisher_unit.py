"""The publisher's pieces without a broker: hand encodings against pamqp's, the confirm tracker, the signals."""

from __future__ import annotations

import threading
import time

import pytest
from pamqp import commands

from magne import wire
from magne.amqp import codec
from magne.amqp.codec import encode_content, publish_method
from magne.amqp.confirms import Nacked, Returned, Tracker
from magne.amqp.errors import BrokerTimeout, ChannelClosed, ConnectionLost, FrameError, PublishError
from magne.engine.sender import Outgoing, reframe
from magne.engine.waker import Signal
from magne.outgoing import BatchResult, Failed, check_delay, json_header, raised
from magne.waiters import Batch as _Batch


@pytest.mark.parametrize("mid", ["0" * 32, "x", "é-ünïcode", "a" * 255])
@pytest.mark.parametrize("size", [0, 1, 77, 1 << 20])
def test_json_header_is_what_pamqp_makes_of_the_wire_properties(mid, size):
    assert json_header(mid, size) == codec.header_payload(wire.properties_for(mid), size)


def test_json_header_refuses_a_message_id_too_long_for_a_shortstr():
    with pytest.raises(ValueError):
        json_header("a" * 256, 1)


@pytest.mark.parametrize("size", [0, 1, 8183, 8184, 8185, 20000, 131072])
@pytest.mark.parametrize("frame_max", [8192, 131072])
def test_encode_content_is_codec_encode_publish(size, frame_max):
    body = bytes(range(256)) * (size // 256) + b"z" * (size % 256)
    props = wire.properties_for("m1")
    header = codec.header_payload(props, len(body))
    ours = encode_content(publish_method("ex", "rk", True), header, body, frame_max)
    assert ours == codec.encode_publish(1, "ex", "rk", body, props, frame_max, mandatory=True)


def test_encode_content_refuses_a_header_larger_than_a_frame():
    with pytest.raises(FrameError):
        encode_content(publish_method("", "q"), b"h" * 9000, b"x", 8192)


def ack(tag, multiple=False):
    return commands.Basic.Ack(delivery_tag=tag, multiple=multiple)


def nack(tag, multiple=False):
    return commands.Basic.Nack(delivery_tag=tag, multiple=multiple)


def test_tracker_multiple_ack_settles_everything_up_to_its_tag_once():
    w = Tracker()
    seqs = [w.add(f"m{i}") for i in range(1, 6)]
    assert seqs == [1, 2, 3, 4, 5] and len(w) == 5
    assert w.confirm(ack(3, True)) == [("m1", None), ("m2", None), ("m3", None)]
    assert w.confirm(ack(3, True)) == []  # a repeated confirm settles nothing twice
    assert w.oldest() == "m4" and len(w) == 2


def test_tracker_single_acks_out_of_order_then_a_multiple():
    w = Tracker()
    for i in range(1, 6):
        w.add(i)
    assert [t for t, _ in w.confirm(ack(4))] == [4]
    assert [t for t, _ in w.confirm(ack(1))] == [1]
    assert w.oldest() == 2
    assert [t for t, _ in w.confirm(ack(5, True))] == [2, 3, 5]
    assert len(w) == 0 and w.oldest() is None


def test_tracker_nack_in_the_middle_fails_only_that_message():
    w = Tracker()
    for i in range(1, 6):
        w.add(i, ("", "q", f"m{i}", hash(b"%d" % i)))
    out = w.confirm(ack(2, True)) + w.confirm(nack(3)) + w.confirm(ack(5, True))
    errors = dict(out)
    assert set(errors) == {1, 2, 3, 4, 5}
    assert isinstance(errors[3], Nacked) and isinstance(errors[3], PublishError) and errors[3].reason == "nack"
    assert all(errors[t] is None for t in (1, 2, 4, 5))


def test_tracker_return_fails_only_its_own_message_among_those_the_ack_covers():
    w = Tracker()
    w.add("a", ("ex", "good", "m1", hash(b"1")))
    w.add("b", ("ex", "nowhere", "m2", hash(b"2")))
    w.add("c", ("ex", "nowhere", "m3", hash(b"3")))
    ret = commands.Basic.Return(reply_code=312, reply_text="NO_ROUTE", exchange="ex", routing_key="nowhere")
    w.returned(ret, "m3", b"3")
    errors = dict(w.confirm(ack(3, True)))
    assert errors["a"] is None and errors["b"] is None  # b went to the same key and was routed: not failed
    assert isinstance(errors["c"], Returned) and errors["c"].reply_code == 312 and errors["c"].reason == "return"


def test_tracker_return_of_a_message_not_covered_by_the_next_ack_fails_nothing_else():
    w = Tracker()
    w.add("a", ("ex", "q", "m1", hash(b"x")))
    w.returned(commands.Basic.Return(312, "NO_ROUTE", "ex", "other"), "m9", b"y")
    assert w.confirm(ack(1)) == [("a", None)]


def test_tracker_lost_hands_back_the_unconfirmed_in_order_and_restarts_numbering():
    w = Tracker()
    for i in range(1, 5):
        w.add(i)
    w.confirm(ack(2))
    assert w.lost() == [1, 3, 4]
    assert len(w) == 0 and w.add("x") == 1


def test_tracker_drop_oldest_while_stops_at_the_first_that_does_not_match():
    w = Tracker()
    for i in range(1, 6):
        w.add(i)
    w.confirm(ack(1))
    assert w.drop_oldest_while(lambda t: t < 4) == [2, 3]
    assert w.confirm(ack(3, True)) == []  # late acks for dropped ones settle nothing
    assert [t for t, _ in w.confirm(ack(5, True))] == [4, 5]


def test_signal_wakes_its_waiter_and_a_set_without_a_waiter_is_kept_once():
    s = Signal()
    assert not s.wait(0.01)
    s.set()
    s.set()  # setting twice is harmless
    assert s.wait(0.01)
    assert not s.wait(0.01)
    got = []
    t = threading.Thread(target=lambda: got.append(s.wait(5)))
    t.start()
    time.sleep(0.05)
    s.set()
    t.join(5)
    assert got == [True]


def test_batch_signals_when_enough_are_settled():
    b = _Batch()
    b.need = 3
    msg = Outgoing("", "q", json_header("m", 1), b"x", "m")
    b(msg, None)
    b(msg, Nacked("no"))
    assert not b.signal.wait(0)
    b(msg, None)
    assert b.signal.wait(0) and b.settled == 3 and [f.reason for f in b.failed] == ["nack"]


def test_batch_result_reports_exactly_what_failed():
    err = Nacked("refused")
    r = BatchResult(["a", "b", "c"], [Failed(1, "b", "nack", err)])
    assert not r.ok and r.sent == ["a", "c"]
    with pytest.raises(PublishError, match="1 of 3"):
        r.raise_on_failure()
    assert BatchResult(["a"], []).raise_on_failure().ok


def test_raised_is_a_fresh_publish_error_per_sender_and_keeps_the_kind():
    shared = ConnectionLost("the broker went away")
    a, b = raised(shared), raised(shared)
    assert a is not b and a is not shared
    assert isinstance(a, PublishError) and isinstance(a, ConnectionLost) and str(a) == str(shared)
    closed = ChannelClosed(1, 404, "NOT_FOUND")
    c = raised(closed)
    assert isinstance(c, PublishError) and isinstance(c, ChannelClosed) and c.code == 404
    t = raised(BrokerTimeout("slow"))
    assert isinstance(t, BrokerTimeout) and isinstance(t, PublishError)
    n = Nacked("refused")
    assert type(raised(n)) is Nacked and raised(n) is not n


@pytest.mark.parametrize("bad", [-1, float("nan"), float("inf"), 10 * 365 * 86400.0])
def test_delays_that_can_never_be_sent_are_refused_before_sending(bad):
    with pytest.raises(ValueError):
        check_delay(bad)


def test_delays_that_can_be_sent():
    assert check_delay(None) is None and check_delay(0) is None and check_delay(1.5) == 1.5
    with pytest.raises(TypeError):
        check_delay("5")


@pytest.mark.parametrize("size", [0, 10, 9000, 300_000])
def test_reframe_for_a_smaller_frame_max_is_what_encoding_for_it_makes(size):
    body = bytes(range(256)) * (size // 256) + b"q" * (size % 256)
    header = json_header("m", len(body))
    big = encode_content(publish_method("ex", "rk", True), header, body, 131072)
    assert reframe(big, 8192) == encode_content(publish_method("ex", "rk", True), header, body, 8192)
