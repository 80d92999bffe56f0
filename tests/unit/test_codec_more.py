"""More of magne.amqp.codec: large frames cut by recv(), bodies that overrun their header, publish framing."""

from __future__ import annotations

import random
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pamqp import body as pbody
from pamqp import commands
from pamqp import frame as pframe
from pamqp import header as pheader

from magne.amqp import codec
from magne.amqp.errors import FrameError


class Collect:
    def __init__(self, max_frame: int = 1 << 20) -> None:
        self.contents: list[tuple] = []
        self.frames: list[tuple] = []
        self.decoder = codec.Decoder(lambda *a: self.contents.append(a), lambda *a: self.frames.append(a), max_frame)


def delivery(tag: int, body: bytes, frame_max: int, channel: int = 1, declared_size: int | None = None) -> bytes:
    out = [
        pframe.marshal(commands.Basic.Deliver("ct", tag, False, "ex", "rk"), channel),
        pframe.marshal(pheader.ContentHeader(0, len(body) if declared_size is None else declared_size,
                                             commands.Basic.Properties(message_id=f"m{tag}")), channel),
    ]
    step = frame_max - 8
    for i in range(0, len(body), step):
        out.append(pframe.marshal(pbody.ContentBody(body[i : i + step]), channel))
    return b"".join(out)


def feed_in_cuts(decoder: codec.Decoder, wire: bytes, sizes: list[int]) -> None:
    pos = 0
    i = 0
    while pos < len(wire):
        n = sizes[i % len(sizes)]
        decoder.feed(wire[pos : pos + n])
        pos += n
        i += 1


@pytest.mark.parametrize("frame_max", [131072, 16384])
def test_large_bodies_in_small_cuts(frame_max):
    rnd = random.Random(frame_max)
    bodies = [rnd.randbytes(100_000), b"", rnd.randbytes(1), rnd.randbytes(frame_max - 8), rnd.randbytes(frame_max - 7),
              rnd.randbytes(250_000)]
    wire = b"".join(delivery(i + 1, b, frame_max) + codec.HEARTBEAT for i, b in enumerate(bodies))
    c = Collect(frame_max)
    feed_in_cuts(c.decoder, wire, [4096])
    assert [x[3] for x in c.contents] == bodies
    assert [x[1][1] for x in c.contents] == list(range(1, len(bodies) + 1))
    assert all(codec.decode_properties(x[2]).message_id == f"m{x[1][1]}" for x in c.contents)
    assert c.frames == []


@settings(max_examples=40, deadline=None)
@given(sizes=st.lists(st.integers(512, 9000), min_size=1, max_size=8), seed=st.integers(0, 2**32 - 1))
def test_random_cuts_of_large_frames(sizes, seed):
    rnd = random.Random(seed)
    frame_max = 32768
    bodies = [rnd.randbytes(rnd.choice([0, 10, 32760, 32761, 70_000])) for _ in range(4)]
    wire = b"".join(delivery(i + 1, b, frame_max) for i, b in enumerate(bodies))
    wire += pframe.marshal(commands.Basic.CancelOk("ct"), 1)
    c = Collect(frame_max)
    feed_in_cuts(c.decoder, wire, sizes)
    assert [x[3] for x in c.contents] == bodies
    assert [type(f) for _, f in c.frames] == [commands.Basic.CancelOk]


def test_a_cut_frame_is_not_joined_again_on_every_read(monkeypatch):
    """The docstring's promise: a frame cut by recv() is kept as pieces and joined once it is whole."""
    joined: list[int] = []
    real = codec._u32

    def spy(buf, pos=0):
        joined.append(len(buf))
        return real(buf, pos)

    body = b"z" * 1_000_000
    wire = delivery(1, body, 1 << 21)
    c = Collect(1 << 21)
    head = wire.index(b"z") - 7  # the body frame's start
    c.decoder.feed(wire[:head])
    monkeypatch.setattr(codec, "_u32", spy)
    feed_in_cuts(c.decoder, wire[head:], [4096])
    assert [x[3] for x in c.contents] == [body]
    # each read of the frame's remainder looks at its head; bytes looked at must stay O(frame size)
    assert sum(joined) <= 4 * len(body), f"{sum(joined) / len(body):.0f}x the frame size re-joined"


def test_body_longer_than_its_header_said_in_one_frame():
    wire = delivery(1, b"x" * 100, 131072, declared_size=50)
    c = Collect()
    with pytest.raises(FrameError, match="longer"):
        c.decoder.feed(wire)
    assert c.contents == []


def test_body_longer_than_its_header_said_over_several_frames():
    wire = delivery(1, b"x" * 100, 48, declared_size=90)  # 40-byte body frames: 40 + 40 + 20 > 90
    c = Collect()
    with pytest.raises(FrameError, match="longer"):
        c.decoder.feed(wire)
    assert c.contents == []


def test_body_without_a_header_and_header_without_a_method():
    c = Collect()
    with pytest.raises(FrameError):
        c.decoder.feed(pframe.marshal(pbody.ContentBody(b"abc"), 1))
    c = Collect()
    with pytest.raises(FrameError):
        c.decoder.feed(pframe.marshal(pheader.ContentHeader(0, 3, commands.Basic.Properties()), 1))


def test_content_on_another_channel_is_a_frame_error():
    wire = delivery(1, b"abc", 131072)
    deliver_and_header = wire[: wire.rindex(b"abc") - 7]
    c = Collect()
    c.decoder.feed(deliver_and_header)
    with pytest.raises(FrameError):
        c.decoder.feed(pframe.marshal(pbody.ContentBody(b"abc"), 2))


def test_method_before_content_complete_is_a_frame_error():
    wire = delivery(1, b"abc", 131072)
    c = Collect()
    c.decoder.feed(wire[: wire.rindex(b"abc") - 7])
    with pytest.raises(FrameError):
        c.decoder.feed(delivery(2, b"d", 131072))


@pytest.mark.parametrize("cut", [5, 20, 40])
def test_truncated_deliver_is_a_frame_error(cut):
    frame = pframe.marshal(commands.Basic.Deliver("consumer-tag", 1, False, "exchange", "routing-key"), 1)
    payload = frame[7:-1][:cut]
    c = Collect()
    with pytest.raises(FrameError):
        c.decoder.feed(struct.pack(">BHI", 1, 1, len(payload)) + payload + b"\xce")


# -- encode_publish ----------------------------------------------------------------------------------
def split_frames(data: bytes) -> list[tuple[int, int, bytes]]:
    out = []
    pos = 0
    while pos < len(data):
        ftype, ch, size = struct.unpack_from(">BHI", data, pos)
        assert data[pos + 7 + size] == 0xCE
        out.append((ftype, ch, data[pos + 7 : pos + 7 + size]))
        pos += 8 + size
    return out


@pytest.mark.parametrize("frame_max", [4096, 8192, 131072])
@pytest.mark.parametrize("size", [0, 1, 4087, 4088, 4089, 8184, 8185, 100_000])
def test_encode_publish_splits_bodies_into_frame_max_chunks(frame_max, size):
    body = random.Random(size).randbytes(size)
    props = commands.Basic.Properties(message_id="abc", headers={"k": "v"}, delivery_mode=2)
    data = codec.encode_publish(7, "ex", "rk", body, props, frame_max, mandatory=True)
    frames = split_frames(data)
    assert all(ch == 7 for _, ch, _ in frames)
    assert [t for t, _, _ in frames[:2]] == [codec.FRAME_METHOD, codec.FRAME_HEADER]
    _, _, publish = pframe.unmarshal(data)
    assert isinstance(publish, commands.Basic.Publish)
    assert (publish.exchange, publish.routing_key, publish.mandatory) == ("ex", "rk", True)
    hdr = pheader.ContentHeader()
    hdr.unmarshal(frames[1][2])
    assert hdr.body_size == size and hdr.properties.message_id == "abc" and hdr.properties.headers == {"k": "v"}
    chunks = [p for t, _, p in frames[2:]]
    assert all(t == codec.FRAME_BODY for t, _, _ in frames[2:])
    assert b"".join(chunks) == body
    assert all(len(p) == frame_max - 8 for p in chunks[:-1])
    assert all(0 < len(p) <= frame_max - 8 for p in chunks)
    assert len(chunks) == -(-size // (frame_max - 8))
    # and magne's own decoder reads it back
    c = Collect(frame_max)
    as_deliver = pframe.marshal(commands.Basic.Deliver("c", 1, False, "ex", "rk"), 7) + data[len(pframe.marshal(publish, 7)):]
    c.decoder.feed(as_deliver)
    assert c.contents[0][3] == body


def test_encode_publish_with_raw_header_bytes_keeps_them():
    payload = codec.header_payload(commands.Basic.Properties(content_type="x/y"), 3)
    data = codec.encode_publish(1, "", "q", b"abc", payload, 4096)
    assert split_frames(data)[1][2] == payload


def test_encode_publish_refuses_a_header_that_does_not_fit():
    frame_max = 4096

    def payload(n: int) -> bytes:
        return codec.header_payload(commands.Basic.Properties(headers={"h": "x" * n}), 3)

    n = frame_max - 8 - len(payload(0))  # a long string grows the payload byte for byte
    assert len(payload(n)) + 8 == frame_max
    data = codec.encode_publish(1, "", "q", b"abc", payload(n), frame_max)  # exactly fits
    assert max(len(p) for _, _, p in split_frames(data)) + 8 == frame_max
    with pytest.raises(FrameError):
        codec.encode_publish(1, "", "q", b"abc", payload(n + 1), frame_max)
    with pytest.raises(FrameError):  # pamqp properties too, not only raw payloads
        codec.encode_publish(1, "", "q", b"abc", commands.Basic.Properties(headers={"h": "x" * 5000}), frame_max)


@settings(max_examples=300, deadline=None)
@given(data=st.binary(min_size=1, max_size=200), cut=st.integers(0, 200))
def test_random_bytes_only_ever_raise_frame_error(data, cut):
    c = Collect(4096)
    try:
        c.decoder.feed(data[:cut])
        c.decoder.feed(data[cut:])
    except FrameError:
        pass


@settings(max_examples=300, deadline=None)
@given(pos=st.integers(0, 10_000), value=st.integers(0, 255), cut=st.integers(0, 10_000))
def test_one_corrupted_byte_in_real_traffic_only_ever_raises_frame_error(pos, value, cut):
    wire = bytearray(delivery(1, b"body" * 10, 4096) + pframe.marshal(commands.Basic.ConsumeOk("ct"), 1)
                     + pframe.marshal(commands.Channel.Close(406, "x", 60, 80), 1) + delivery(2, b"", 4096))
    wire[pos % len(wire)] = value
    c = Collect(4096)
    try:
        c.decoder.feed(bytes(wire[: cut % len(wire)]))
        c.decoder.feed(bytes(wire[cut % len(wire):]))
    except FrameError:
        pass
