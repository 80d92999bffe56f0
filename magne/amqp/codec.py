"""AMQP 0-9-1 framing: bytes in, calls out; a few hot encodings. No sockets here.

Why partly by hand: on this 2-core box, pamqp decoding every frame drained 13.7k
msg/s while slicing the three hot frames (basic.deliver, content header, body) with
`struct` and leaving everything else to pamqp drained 33.7k msg/s (issue 2's
table, 50k persistent messages, 8 threads, prefetch 256). So basic.deliver,
content headers, bodies and ack/reject/nack are done here; every other frame is
decoded and encoded by pamqp. tests/unit/test_codec.py checks these against pamqp
on the same bytes, cut at random points as recv() cuts them.
"""

from __future__ import annotations

import functools
import struct
from collections.abc import Callable
from typing import Any

from pamqp import commands
from pamqp import frame as pframe
from pamqp import header as pheader

from magne.amqp import names
from magne.amqp.errors import FrameError

FRAME_METHOD = 1
FRAME_HEADER = 2
FRAME_BODY = 3
FRAME_HEARTBEAT = 8
FRAME_END = 0xCE
FRAME_OVERHEAD = 8  # type (1) + channel (2) + size (4) + end (1)
# The largest message RabbitMQ takes (its max_message_size cannot be set higher): a content header announcing more
# is not from RabbitMQ, and its body would be buffered whole before anything could refuse it.
MAX_BODY = 512 << 20

_frame_head = struct.Struct(">BHI").unpack_from
_u32 = struct.Struct(">I").unpack_from
_tag_bit = struct.Struct(">QB").unpack_from
_content_head = struct.Struct(">HHQ").unpack_from
_header_frame_head = struct.Struct(">BHI").pack

DELIVER_INDEX = commands.Basic.Deliver.index  # class 60, method 60
_CONTENT_METHODS = (commands.Basic.GetOk, commands.Basic.Return)

# basic.ack / basic.reject / basic.nack: frame head, class, method, tag, bits, end.
_ack = struct.Struct(">BHIHHQBB").pack


def encode_ack(channel: int, tag: int, multiple: bool) -> bytes:
    return _ack(FRAME_METHOD, channel, 13, 60, 80, tag, 1 if multiple else 0, FRAME_END)


def encode_reject(channel: int, tag: int, requeue: bool) -> bytes:
    return _ack(FRAME_METHOD, channel, 13, 60, 90, tag, 1 if requeue else 0, FRAME_END)


def encode_nack(channel: int, tag: int, multiple: bool, requeue: bool) -> bytes:
    bits = (1 if multiple else 0) | (2 if requeue else 0)
    return _ack(FRAME_METHOD, channel, 13, 60, 120, tag, bits, FRAME_END)


HEARTBEAT = bytes((FRAME_HEARTBEAT, 0, 0, 0, 0, 0, 0, FRAME_END))


def encode(channel: int, *methods: Any) -> bytes:
    """pamqp marshals the cold frames (handshake, declares, closes, confirms)."""
    return b"".join(pframe.marshal(m, channel) for m in methods)


def header_payload(properties: commands.Basic.Properties, body_size: int) -> bytes:
    """A content header's payload (class, weight, body size, flags, properties), from pamqp properties."""
    return pframe.marshal(pheader.ContentHeader(0, body_size, properties), 0)[7:-1]


@functools.lru_cache(maxsize=4096)
def publish_method(exchange: str, routing_key: str, mandatory: bool = True, channel: int = 1) -> bytes:
    """The basic.publish method frame, the same bytes for every message to one destination: cached, since
    pamqp's marshal costs about 5 us and a bulk publish sends thousands to the same place."""
    return pframe.marshal(names.BasicPublish(exchange=exchange, routing_key=routing_key, mandatory=mandatory), channel)


def encode_content(method_frame: bytes, header: bytes, body: bytes, frame_max: int, channel: int = 1) -> bytes:
    """A publish as bytes: the method frame (from publish_method), the content header (`header` is its payload,
    e.g. from header_payload or magne.amqp.properties) and the body in frames of at most `frame_max`.
    The one publish encoder: every publish of magne goes through here."""
    if len(header) + FRAME_OVERHEAD > frame_max:
        raise FrameError(f"content header of {len(header)} bytes does not fit frame_max {frame_max}")
    chunk = frame_max - FRAME_OVERHEAD
    if len(body) <= chunk:
        if not body:
            return b"".join((method_frame, _header_frame_head(FRAME_HEADER, channel, len(header)), header, b"\xce"))
        return b"".join((method_frame, _header_frame_head(FRAME_HEADER, channel, len(header)), header, b"\xce",
                         _header_frame_head(FRAME_BODY, channel, len(body)), body, b"\xce"))
    parts = [method_frame, _header_frame_head(FRAME_HEADER, channel, len(header)), header, b"\xce"]
    for start in range(0, len(body), chunk):
        piece = body[start : start + chunk]
        parts += (_header_frame_head(FRAME_BODY, channel, len(piece)), piece, b"\xce")
    return b"".join(parts)


def encode_publish(
    channel: int,
    exchange: str,
    routing_key: str,
    body: bytes,
    properties: commands.Basic.Properties | bytes,
    frame_max: int,
    mandatory: bool = False,
) -> bytes:
    """basic.publish + content header + body frames, from pamqp properties or a ready header payload (bytes,
    see magne.amqp.properties, which lets a copy keep the original's properties bit-exact)."""
    payload = properties if isinstance(properties, bytes) else header_payload(properties, len(body))
    return encode_content(publish_method(exchange, routing_key, mandatory, channel), payload, body, frame_max, channel)


def decode_properties(header_payload: bytes) -> commands.Basic.Properties:
    """Decode a content header's properties (cold path: only failures and logs need them)."""
    h = pheader.ContentHeader()
    h.unmarshal(header_payload)
    return h.properties


# A decoded basic.deliver: (consumer_tag, delivery_tag, redelivered, exchange, routing_key)
DeliverArgs = tuple[bytes, int, bool, bytes, bytes]
OnContent = Callable[[int, Any, bytes, bytes], None]
OnFrame = Callable[[int, Any], None]


class Decoder:
    """Turns the incoming byte stream into calls.

    on_content(channel, method, header_payload, body) for every complete message,
    where method is DeliverArgs for basic.deliver (hand-decoded) or the pamqp frame
    for basic.get-ok / basic.return; on_frame(channel, pamqp_frame) for every other
    method frame. Heartbeats are swallowed: the caller tracks that bytes arrived.
    Called by whichever thread owns the socket (the I/O thread, or a blocking client).

    A frame cut by recv() is kept as pieces and joined once it is whole, so a read
    is never copied as a whole to prepend a few leftover bytes. A frame larger than
    `max_frame` (what was negotiated) is a protocol error, never a reason to buffer
    gigabytes because a size field said so.
    """

    __slots__ = ("_pending", "_pending_len", "_method", "_channel", "_header", "_size", "_chunks", "_got",
                 "on_content", "on_frame", "max_frame", "channels_open", "channels_closing")

    def __init__(self, on_content: OnContent, on_frame: OnFrame, max_frame: int = 1 << 20) -> None:
        self._pending: list[bytes] = []  # the start of a frame that recv() cut
        self._pending_len = 0
        self._method: Any = None
        self._channel = 0
        self._header = b""
        self._size = -1  # body size expected; -1: no content header seen yet
        self._chunks: list[bytes] = []
        self._got = 0
        self.on_content = on_content
        self.on_frame = on_frame
        self.max_frame = max_frame
        # The channels content may arrive on, and those whose content is dropped (closing); set by the owner
        # (magne.amqp.protocol shares its own sets). None: every channel (a bare decoder, in tests and tools).
        self.channels_open: set[int] | None = None
        self.channels_closing: set[int] = set()

    def feed(self, data: bytes) -> None:
        pos = 0
        if self._pending:
            # Complete the cut frame with just the bytes it lacks, then parse the rest of `data` in place.
            # Invariant: once 7 bytes are pending, the first piece holds them (the frame head).
            if self._pending_len < 7:
                pos = min(7 - self._pending_len, len(data))
                self._pending.append(data[:pos])
                self._pending_len += pos
                if self._pending_len < 7:
                    return
                self._pending = [b"".join(self._pending)]
            total = 8 + self._check_size(_u32(self._pending[0], 3)[0])
            missing = total - self._pending_len
            if len(data) - pos < missing:
                if pos < len(data):
                    self._pending.append(data[pos:])
                    self._pending_len += len(data) - pos
                return  # still incomplete: the pieces are joined once, when the frame is whole
            frame = b"".join(self._pending) + data[pos : pos + missing]
            self._pending, self._pending_len = [], 0
            self._parse(frame, len(frame))
            pos += missing
        end = self._parse(data, len(data), pos)
        if end < len(data):
            rest = data[end:]
            self._pending, self._pending_len = [rest], len(rest)

    def _check_size(self, size: int) -> int:
        if size + FRAME_OVERHEAD > self.max_frame:
            raise FrameError(f"frame of {size} bytes exceeds the negotiated frame_max of {self.max_frame}")
        return size

    def _parse(self, buf: bytes, n: int, pos: int = 0) -> int:
        """Handle every whole frame in buf[pos:n]; return where the first incomplete one starts."""
        while n - pos >= 8:
            ftype, channel, size = _frame_head(buf, pos)
            if size + FRAME_OVERHEAD > self.max_frame:
                self._check_size(size)
            end = pos + 7 + size
            if end >= n:
                break
            if buf[end] != FRAME_END:
                raise FrameError(f"frame does not end with 0xCE (type {ftype}, channel {channel}, size {size})")
            start = pos + 7
            pos = end + 1
            if ftype == FRAME_METHOD:
                if size >= 4 and _u32(buf, start)[0] == DELIVER_INDEX:
                    self._expect(channel, _deliver_args(buf, start, end))
                else:
                    method = _unmarshal(buf[start - 7 : end + 1])
                    if isinstance(method, _CONTENT_METHODS):
                        self._expect(channel, method)
                    else:
                        self.on_frame(channel, method)
            elif ftype == FRAME_HEADER:
                if self._method is None or channel != self._channel or self._size != -1 or size < 14:
                    raise FrameError(f"unexpected content header on channel {channel}")
                self._header = buf[start:end]
                self._size = _content_head(buf, start)[2]
                if self._size > MAX_BODY:
                    raise FrameError(f"content header announces a body of {self._size} bytes (RabbitMQ takes at most "
                                     f"{MAX_BODY})")
                if self._size == 0:
                    self._complete(b"")
            elif ftype == FRAME_BODY:
                if self._size < 0 or channel != self._channel:
                    raise FrameError(f"unexpected content body on channel {channel}")
                chunk = buf[start:end]
                if not self._chunks and self._got + len(chunk) == self._size:
                    self._complete(chunk)  # the common case: the whole body in one frame
                else:
                    self._chunks.append(chunk)
                    self._got += len(chunk)
                    if self._got > self._size:
                        raise FrameError(f"content body longer than its header said ({self._got} > {self._size})")
                    if self._got == self._size:
                        self._complete(b"".join(self._chunks))
            elif ftype != FRAME_HEARTBEAT:
                raise FrameError(f"unknown frame type {ftype}")
            elif channel:
                raise FrameError(f"heartbeat frame on channel {channel} (heartbeats belong to channel 0)")
        return pos

    def _expect(self, channel: int, method: Any) -> None:
        if self._method is not None:
            raise FrameError("method frame arrived before the previous message's content was complete")
        opened = self.channels_open
        if opened is not None and channel not in opened:  # one set lookup per delivery
            if channel not in self.channels_closing:
                raise FrameError(f"content on channel {channel}, which is not open")
            method = _DROP  # sent before the broker saw our channel.close: assembled, then dropped
        self._method = method
        self._channel = channel

    def _complete(self, body: bytes) -> None:
        method, channel, header = self._method, self._channel, self._header
        self._method = None
        self._size = -1
        self._chunks = []
        self._got = 0
        self._header = b""
        if method is not _DROP:
            self.on_content(channel, method, header, body)


_DROP = ("drop",)  # the method of content that is assembled but not delivered


def _deliver_args(buf: bytes, p: int, end: int) -> DeliverArgs:
    try:
        p += 4
        ln = buf[p]
        ctag = buf[p + 1 : p + 1 + ln]
        p += 1 + ln
        tag, redelivered = _tag_bit(buf, p)
        p += 9
        ln = buf[p]
        exchange = buf[p + 1 : p + 1 + ln]
        p += 1 + ln
        ln = buf[p]
        if p + 1 + ln > end:
            raise IndexError
        return ctag, tag, bool(redelivered & 1), exchange, buf[p + 1 : p + 1 + ln]
    except (IndexError, struct.error):
        raise FrameError("truncated basic.deliver") from None


def _unmarshal(frame: bytes) -> Any:
    try:
        return pframe.unmarshal(frame)[2]
    except Exception as exc:  # pamqp raises several types on bytes that are not AMQP
        raise FrameError(f"undecodable method frame: {type(exc).__name__}") from None
