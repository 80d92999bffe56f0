"""The publisher's pieces without a broker: hand encodings against pamqp's, the confirm window, the signals."""

from __future__ import annotations

import threading
import time

import pytest
from pamqp import commands

from magne import wire
from magne.amqp import codec
from magne.amqp.client import ConfirmWindow, Nacked, Returned, encode_content, publish_method
from magne.amqp.errors import FrameError, PublishError
from magne.publisher import BatchResult, Failed, _Batch, _Signal, json_header


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


def test_window_multiple_ack_settles_everything_up_to_its_tag_once():
    w = ConfirmWindow()
    seqs = [w.add(f"m{i}") for i in range(1, 6)]
    assert seqs == [1, 2, 3, 4, 5] and len(w) == 5
    assert [(s, t, e) for s, t, e in w.confirm(ack(3, True))] == [(1, "m1", None), (2, "m2", None), (3, "m3", None)]
    assert w.confirm(ack(3, True)) == []  # a repeated confirm settles nothing twice
    assert w.oldest() == "m4" and len(w) == 2


def test_window_single_acks_out_of_order_then_a_multiple():
    w = ConfirmWindow()
    for i in range(1, 6):
        w.add(i)
    assert [t for _, t, _ in w.confirm(ack(4))] == [4]
    assert [t for _, t, _ in w.confirm(ack(1))] == [1]
    assert w.oldest() == 2
    assert [t for _, t, _ in w.confirm(ack(5, True))] == [2, 3, 5]
    assert len(w) == 0 and w.oldest() is None


def test_window_nack_in_the_middle_fails_only_that_message():
    w = ConfirmWindow()
    for i in range(1, 6):
        w.add(i, ("", "q", b"%d" % i))
    out = w.confirm(ack(2, True)) + w.confirm(nack(3)) + w.confirm(ack(5, True))
    errors = {t: e for _, t, e in out}
    assert set(errors) == {1, 2, 3, 4, 5}
    assert isinstance(errors[3], Nacked) and isinstance(errors[3], PublishError) and errors[3].reason == "nack"
    assert all(errors[t] is None for t in (1, 2, 4, 5))


def test_window_return_marks_the_matching_message_and_its_ack_fails_it():
    w = ConfirmWindow()
    w.add("a", ("ex", "good", b"1"))
    w.add("b", ("ex", "nowhere", b"2"))
    w.add("c", ("ex", "nowhere", b"3"))
    ret = commands.Basic.Return(reply_code=312, reply_text="NO_ROUTE", exchange="ex", routing_key="nowhere")
    assert w.returned(ret, b"3")
    assert not w.returned(commands.Basic.Return(exchange="ex", routing_key="other"), b"3")
    errors = {t: e for _, t, e in w.confirm(ack(3, True))}
    assert errors["a"] is None and errors["b"] is None
    assert isinstance(errors["c"], Returned) and errors["c"].reply_code == 312 and errors["c"].reason == "return"


def test_window_clear_hands_back_the_unconfirmed_in_order_and_restarts_numbering():
    w = ConfirmWindow()
    for i in range(1, 5):
        w.add(i)
    w.confirm(ack(2))
    assert w.clear() == [1, 3, 4]
    assert len(w) == 0 and w.add("x") == 1


def test_window_drop_oldest_while_stops_at_the_first_that_does_not_match():
    w = ConfirmWindow()
    for i in range(1, 6):
        w.add(i)
    w.confirm(ack(1))
    assert w.drop_oldest_while(lambda t: t < 4) == [2, 3]
    assert w.confirm(ack(3, True)) == []  # late acks for dropped ones settle nothing
    assert [t for _, t, _ in w.confirm(ack(5, True))] == [4, 5]


def test_signal_wakes_its_waiter_and_a_set_without_a_waiter_is_kept_once():
    s = _Signal()
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
    b.settle(None)  # type: ignore[arg-type]
    b.settle(None)  # type: ignore[arg-type]
    assert not b.signal.wait(0)
    b.settle(None)  # type: ignore[arg-type]
    assert b.signal.wait(0) and b.settled == 3


def test_batch_result_reports_exactly_what_failed():
    err = Nacked("refused")
    r = BatchResult(["a", "b", "c"], [Failed(1, "b", "nack", err)])
    assert not r.ok and r.sent == ["a", "c"]
    with pytest.raises(PublishError, match="1 of 3"):
        r.raise_on_failure()
    assert BatchResult(["a"], []).raise_on_failure().ok
