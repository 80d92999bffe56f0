"""Content-header properties as raw bytes, so a copy can keep the original's bit-exact.

Why by hand: a retry or dead-letter copy must carry the publisher's properties and
headers unchanged, and pamqp cannot round-trip them: it decodes a double 0.1 and
encodes it back as the 32-bit 0.10000000149011612, and a value it cannot encode
(a double 1e300) fails the whole header. So a copy's header is spliced: every
property and every header entry of the original is copied as the bytes it arrived
in, entries whose key matches `drop` are left out, and magne's own entries
(encoded by pamqp: strings, ints and tables of them, which it writes exactly) are
appended. tests/unit/test_properties.py checks the walkers against pamqp.

Layout (AMQP 0-9-1, 4.2.6): class id, weight, body size, then 16-bit property
flag words (bit 0 of a word = another word follows) and the present properties in
flag order.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from typing import Any

from pamqp import encode as pencode

from magne.amqp.errors import FrameError

# (name, kind): s = shortstr, t = table, o = octet, q = 64-bit timestamp
FIELDS = (
    ("content_type", "s"), ("content_encoding", "s"), ("headers", "t"), ("delivery_mode", "o"),
    ("priority", "o"), ("correlation_id", "s"), ("reply_to", "s"), ("expiration", "s"),
    ("message_id", "s"), ("timestamp", "q"), ("type", "s"), ("user_id", "s"), ("app_id", "s"),
    ("cluster_id", "s"),
)
_u16 = struct.Struct(">H")
_u32 = struct.Struct(">I")
_prefix = struct.Struct(">HHQ")

# Field-table value sizes by type tag (RabbitMQ's reading of 0-9-1): fixed, or a 4-byte length prefix.
_FIXED = {"t": 1, "b": 1, "B": 1, "s": 2, "u": 2, "I": 4, "i": 4, "l": 8, "L": 8, "f": 4, "d": 8, "D": 5, "T": 8, "V": 0}
_LONG = frozenset("SxAF")


def split(payload: bytes) -> tuple[int, dict[str, bytes]]:
    """Header payload → (body size, {property name: raw value bytes}). Raises FrameError if malformed."""
    try:
        _cls, _weight, body_size = _prefix.unpack_from(payload, 0)
        pos = 12
        flags: list[int] = []
        while True:
            word = _u16.unpack_from(payload, pos)[0]
            pos += 2
            flags.append(word)
            if not word & 1:
                break
        raw: dict[str, bytes] = {}
        for i, (name, kind) in enumerate(FIELDS):
            word, bit = divmod(i, 15)
            if word >= len(flags) or not flags[word] & (1 << (15 - bit)):
                continue
            start = pos
            if kind == "s":
                pos += 1 + payload[pos]
            elif kind == "t":
                pos += 4 + _u32.unpack_from(payload, pos)[0]
            elif kind == "o":
                pos += 1
            else:
                pos += 8
            if pos > len(payload):
                raise IndexError
            raw[name] = payload[start:pos]
        return body_size, raw
    except (IndexError, struct.error):
        raise FrameError("malformed content header properties") from None


def join(body_size: int, raw: dict[str, bytes]) -> bytes:
    """The inverse of split: a header payload for class basic (60) with these raw properties."""
    flags = 0
    parts = []
    for i, (name, _kind) in enumerate(FIELDS):
        if name in raw:
            flags |= 1 << (15 - i)
            parts.append(raw[name])
    return _prefix.pack(60, 0, body_size) + _u16.pack(flags) + b"".join(parts)


def table_entries(raw_table: bytes) -> list[tuple[str, bytes]]:
    """A raw field table (with its 4-byte length) → [(key, raw entry bytes incl. key)], values untouched."""
    try:
        end = 4 + _u32.unpack_from(raw_table, 0)[0]
        if end > len(raw_table):
            raise IndexError
        pos = 4
        out = []
        while pos < end:
            start = pos
            klen = raw_table[pos]
            key = raw_table[pos + 1 : pos + 1 + klen].decode("utf-8", "replace")
            pos += 1 + klen
            tag = chr(raw_table[pos])
            pos += 1
            if tag in _FIXED:
                pos += _FIXED[tag]
            elif tag in _LONG:
                pos += 4 + _u32.unpack_from(raw_table, pos)[0]
            else:
                raise IndexError
            if pos > end:
                raise IndexError
            out.append((key, raw_table[start:pos]))
        return out
    except (IndexError, struct.error):
        raise FrameError("malformed headers table") from None


def encode_entries(values: dict[str, Any]) -> bytes:
    """magne's own header entries, as raw table entries (without the table's length)."""
    return pencode.field_table(values)[4:]


def splice(
    payload: bytes,
    add: dict[str, Any],
    drop: Callable[[str], bool],
    delivery_mode: int | None = 2,
    keep_user_headers: bool = True,
) -> bytes:
    """The original header with header entries matching `drop` removed and `add` appended.

    Everything else is copied byte for byte. `keep_user_headers=False` also leaves
    out every original header entry (for a copy whose headers cannot fit).
    Raises FrameError if the original cannot be walked.
    """
    body_size, raw = split(payload)
    entries = b""
    if keep_user_headers and "headers" in raw:
        entries = b"".join(e for key, e in table_entries(raw["headers"]) if not drop(key))
    entries += encode_entries(add)
    raw["headers"] = _u32.pack(len(entries)) + entries
    if delivery_mode is not None:
        raw["delivery_mode"] = bytes((delivery_mode,))
    return join(body_size, raw)
