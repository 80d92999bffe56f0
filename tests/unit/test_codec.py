"""The hand-written hot-frame codec, checked against pamqp on the same bytes."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pamqp import body as pbody
from pamqp import commands
from pamqp import frame as pframe
from pamqp import header as pheader

from magne.amqp import codec as frames

shortstr = st.text(alphabet=st.characters(codec="ascii", exclude_characters="\x00"), max_size=40)
exchange_name = st.text(alphabet="abcXYZ019-_.:", max_size=40)  # what pamqp accepts


def marshal_delivery(ch: int, ctag: str, tag: int, redelivered: bool, exchange: str, rk: str,
                     props: commands.Basic.Properties, body: bytes, frame_max: int) -> bytes:
    out = [
        pframe.marshal(commands.Basic.Deliver(ctag, tag, redelivered, exchange, rk), ch),
        pframe.marshal(pheader.ContentHeader(0, len(body), props), ch),
    ]
    step = frame_max - 8
    for i in range(0, len(body), step):
        out.append(pframe.marshal(pbody.ContentBody(body[i:i + step]), ch))
    return b"".join(out)


class Collect:
    def __init__(self) -> None:
        self.contents: list[tuple] = []
        self.frames: list[tuple] = []
        self.decoder = frames.Decoder(lambda *a: self.contents.append(a), lambda *a: self.frames.append(a))


@settings(max_examples=200, deadline=None)
@given(
    ctag=shortstr, tag=st.integers(1, 2**63 - 1), redelivered=st.booleans(), exchange=exchange_name, rk=shortstr,
    body=st.binary(max_size=3000), frame_max=st.integers(4096, 5000), cuts=st.lists(st.integers(0, 4000), max_size=6),
    message_id=st.one_of(st.none(), shortstr.filter(bool)),
    headers=st.one_of(st.none(), st.dictionaries(shortstr, st.integers(-5, 5))),
)
def test_deliveries_decode_like_pamqp(ctag, tag, redelivered, exchange, rk, body, frame_max, cuts, message_id, headers):
    props = commands.Basic.Properties(message_id=message_id, headers=headers or None, delivery_mode=2)
    wire = marshal_delivery(1, ctag, tag, redelivered, exchange, rk, props, body, frame_max)
    wire += frames.HEARTBEAT + marshal_delivery(1, ctag, tag + 1 if tag < 2**63 - 1 else 1, False, "", rk, props, b"", frame_max)
    c = Collect()
    # The stream may be cut anywhere by recv(): feed it in arbitrary pieces.
    points = sorted({min(x, len(wire)) for x in cuts})
    start = 0
    for p in [*points, len(wire)]:
        c.decoder.feed(wire[start:p])
        start = p
    assert len(c.contents) == 2 and not c.frames
    channel, method, header, got_body = c.contents[0]
    # pamqp's reading of the same deliver frame
    _, _, deliver = pframe.unmarshal(wire)
    assert channel == 1
    assert method == (deliver.consumer_tag.encode(), deliver.delivery_tag, deliver.redelivered,
                      deliver.exchange.encode(), deliver.routing_key.encode())
    assert got_body == body
    decoded = frames.decode_properties(header)
    assert decoded.message_id == message_id
    assert (decoded.headers or None) == (headers or None)
    assert c.contents[1][3] == b""


@given(tag=st.integers(1, 2**63 - 1), multiple=st.booleans(), requeue=st.booleans(), ch=st.integers(1, 65535))
def test_ack_reject_encode_like_pamqp(tag, multiple, requeue, ch):
    assert frames.encode_ack(ch, tag, multiple) == pframe.marshal(commands.Basic.Ack(tag, multiple), ch)
    assert frames.encode_reject(ch, tag, requeue) == pframe.marshal(commands.Basic.Reject(tag, requeue), ch)


def test_heartbeat_matches_pamqp():
    from pamqp import heartbeat

    assert frames.HEARTBEAT == pframe.marshal(heartbeat.Heartbeat(), 0)


def test_other_frames_go_through_pamqp():
    c = Collect()
    c.decoder.feed(pframe.marshal(commands.Basic.ConsumeOk("abc"), 1) + pframe.marshal(commands.Channel.Close(406, "x", 0, 0), 1))
    assert [type(f) for _, f in c.frames] == [commands.Basic.ConsumeOk, commands.Channel.Close]


def test_get_ok_carries_content():
    c = Collect()
    wire = pframe.marshal(commands.Basic.GetOk(7, False, "", "q", 0), 1)
    wire += pframe.marshal(pheader.ContentHeader(0, 3, commands.Basic.Properties()), 1)
    wire += pframe.marshal(pbody.ContentBody(b"abc"), 1)
    c.decoder.feed(wire)
    assert isinstance(c.contents[0][1], commands.Basic.GetOk) and c.contents[0][3] == b"abc"


def test_publish_splits_body_like_frame_max():
    data = frames.encode_publish(1, "ex", "rk", b"x" * 10000, commands.Basic.Properties(), 4096)
    sizes = []
    pos = 0
    while pos < len(data):
        ftype, _, size = struct.unpack_from(">BHI", data, pos)
        sizes.append((ftype, size))
        pos += 8 + size
    assert [t for t, _ in sizes] == [1, 2, 3, 3, 3]
    assert all(s <= 4096 - 8 for t, s in sizes if t == 3)


def test_garbage_is_a_frame_error():
    c = Collect()
    with pytest.raises(frames.FrameError):
        c.decoder.feed(b"\x01\x00\x01\x00\x00\x00\x01\x00\x00")
