"""magne.amqp.properties (raw content-header walking and splicing) and magne.wire.copy_header."""

from __future__ import annotations

import datetime
import decimal
import struct

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pamqp import commands
from pamqp import decode as pdecode
from pamqp import encode as pencode

from magne import wire
from magne.amqp import codec, properties
from magne.amqp.errors import FrameError

UTC = datetime.UTC

shortstr = st.text(max_size=40)
keys = st.text(alphabet=st.characters(codec="utf-8", exclude_categories=("Cs",)), min_size=1, max_size=20)
scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**63), 2**63 - 1),
    st.floats(width=32, allow_nan=False),
    st.text(max_size=60),
    st.binary(max_size=30).map(bytearray),
    st.decimals(places=3, min_value=-10**6, max_value=10**6, allow_nan=False, allow_infinity=False),
    st.datetimes(min_value=datetime.datetime(1970, 1, 2), max_value=datetime.datetime(2200, 1, 1),
                 timezones=st.just(UTC)).map(lambda d: d.replace(microsecond=0)),
)
values = st.recursive(scalars, lambda inner: st.one_of(st.lists(inner, max_size=4),
                                                       st.dictionaries(keys, inner, max_size=4)), max_leaves=12)
tables = st.dictionaries(keys, values, max_size=8)


@st.composite
def basic_properties(draw) -> commands.Basic.Properties:
    kw = {}
    for name, strategy in [
        ("content_type", shortstr), ("content_encoding", shortstr), ("headers", tables),
        ("delivery_mode", st.sampled_from([1, 2])), ("priority", st.integers(0, 255)),
        ("correlation_id", shortstr), ("reply_to", shortstr), ("expiration", st.text("0123456789", max_size=9)),
        ("message_id", shortstr),
        ("timestamp", st.datetimes(min_value=datetime.datetime(1970, 1, 2), max_value=datetime.datetime(2200, 1, 1),
                                   timezones=st.just(UTC)).map(lambda d: d.replace(microsecond=0))),
        ("message_type", shortstr), ("user_id", shortstr), ("app_id", shortstr),
    ]:
        if draw(st.booleans()):
            kw[name] = draw(strategy)
    return commands.Basic.Properties(**kw)


PAMQP_NAME = {"type": "message_type"}


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(props=basic_properties(), body_size=st.integers(0, 2**64 - 1))
def test_split_join_round_trip_against_pamqp(props, body_size):
    payload = codec.header_payload(props, body_size)
    size, raw = properties.split(payload)
    assert size == body_size
    assert properties.join(size, raw) == payload
    present = {name for name, _ in properties.FIELDS if getattr(props, PAMQP_NAME.get(name, name)) not in (None, "")}
    assert set(raw) == present
    for name, kind in properties.FIELDS:
        if name not in raw:
            continue
        value = getattr(props, PAMQP_NAME.get(name, name))
        if kind == "s":
            assert raw[name] == pencode.short_string(value)
        elif kind == "o":
            assert raw[name] == bytes((value,))
        elif kind == "t":
            assert raw[name] == pencode.field_table(value)
    # every property reaches pamqp again unchanged through join
    again = codec.decode_properties(properties.join(size, raw))
    assert again == codec.decode_properties(payload)


def test_join_of_nothing_is_an_empty_header():
    payload = properties.join(7, {})
    assert properties.split(payload) == (7, {})
    assert codec.decode_properties(payload) == commands.Basic.Properties()


# -- field tables ---------------------------------------------------------------------------------------
def _check_entries(table: bytes) -> list[tuple[str, bytes]]:
    entries = properties.table_entries(table)
    assert b"".join(e for _, e in entries) == table[4:]
    for key, entry in entries:
        one = struct.pack(">I", len(entry)) + entry
        _, decoded = pdecode.field_table(one)
        assert list(decoded) == [key]
    return entries


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(table=tables)
def test_table_entries_of_pamqp_tables(table):
    raw = pencode.field_table(table)
    entries = _check_entries(raw)
    assert [k for k, _ in entries] == list(pdecode.field_table(raw)[1])  # pamqp writes the keys sorted
    assert sorted(k for k, _ in entries) == sorted(table)


def test_table_entries_of_every_type_pamqp_writes():
    table = {
        "t": True, "b": -5, "s": -3000, "u": 60000, "I": -70000, "i": 3_000_000_000, "l": -(2**62),
        "f": 1.5, "D": decimal.Decimal("3.14"), "S": "long string ✓", "T": datetime.datetime(2024, 1, 1, tzinfo=UTC),
        "F": {"nested": [1, "two", None]}, "A": [1, [2, {"x": 3}]], "x": bytearray(b"\x00\xff"), "V": None,
    }
    raw = pencode.field_table(table)
    tags = {k: chr(e[len(k) + 1]) for k, e in _check_entries(raw)}
    # the keys name the type tag pamqp picks for each value: every tag pamqp encodes is covered
    assert tags == {k: k for k in table}


def test_table_entries_of_hand_written_types():
    # 'B' unsigned octet, 'L' unsigned 64, 'd' double, 'D' decimal, 'T' timestamp: written by other clients
    entries = [
        b"\x01aB\xff", b"\x01bL" + struct.pack(">Q", 2**64 - 1), b"\x01cd" + struct.pack(">d", 0.1),
        b"\x01dD\x02" + struct.pack(">i", 314), b"\x01eT" + struct.pack(">Q", 1_700_000_000), b"\x01fV",
        b"\x01gx" + struct.pack(">I", 3) + b"abc",
    ]
    raw = struct.pack(">I", sum(map(len, entries))) + b"".join(entries)
    assert [e for _, e in properties.table_entries(raw)] == entries
    assert properties.table_entries(struct.pack(">I", 0)) == []


def hand_payload(entries: list[bytes], delivery_mode: int | None = 1, message_id: bytes = b"mid-1",
                 body_size: int = 42) -> bytes:
    """A content header written by hand (pamqp cannot write a 'd' double, and reads 0.1 back as a float)."""
    table = struct.pack(">I", sum(map(len, entries))) + b"".join(entries)
    raw = {"content_type": b"\x10application/json", "headers": table, "message_id": bytes((len(message_id),)) + message_id,
           "timestamp": struct.pack(">Q", 1_700_000_000), "app_id": b"\x03app"}
    if delivery_mode is not None:
        raw["delivery_mode"] = bytes((delivery_mode,))
    return properties.join(body_size, raw)


DOUBLE_01 = b"\x05pointd" + struct.pack(">d", 0.1)
DOUBLE_BIG = b"\x04huged" + struct.pack(">d", 1e300)
OLD_RETRIES = b"\x0fx-magne-retriesb\x07"
OLD_OTHER = b"\x0bx-magne-fooS\x00\x00\x00\x03bar"
USER = b"\x04userS\x00\x00\x00\x05alice"


def test_splice_keeps_doubles_bit_exact_drops_magne_entries_appends_new():
    original = hand_payload([DOUBLE_01, OLD_RETRIES, DOUBLE_BIG, OLD_OTHER, USER])
    out = properties.splice(original, {wire.RETRIES: 3, wire.REASON: "task raised"}, wire.is_magne_header)
    size, raw = properties.split(out)
    _, orig_raw = properties.split(original)
    assert size == 42
    entries = properties.table_entries(raw["headers"])
    # the publisher's entries, byte for byte and in order; the old x-magne-* gone; the new ones after them
    assert [e for _, e in entries[:3]] == [DOUBLE_01, DOUBLE_BIG, USER]
    assert [k for k, _ in entries] == ["point", "huge", "user", wire.REASON, wire.RETRIES]
    assert raw["headers"][4:].startswith(DOUBLE_01 + DOUBLE_BIG + USER)
    assert struct.unpack(">d", entries[0][1][-8:])[0] == 0.1
    assert struct.unpack(">d", entries[1][1][-8:])[0] == 1e300
    # magne's entries as pamqp reads them
    headers = codec.decode_properties(out).headers
    assert headers[wire.RETRIES] == 3 and headers[wire.REASON] == "task raised"
    assert "x-magne-foo" not in headers
    # every other property is copied as it arrived; delivery mode set to persistent
    assert raw["delivery_mode"] == b"\x02"
    for name in ("content_type", "message_id", "timestamp", "app_id"):
        assert raw[name] == orig_raw[name]
    assert set(raw) == set(orig_raw)


def test_splice_delivery_mode_and_user_headers_options():
    original = hand_payload([DOUBLE_01, USER], delivery_mode=None)
    keep = properties.splice(original, {}, wire.is_magne_header, delivery_mode=None)
    assert keep == original
    persistent = properties.split(properties.splice(original, {}, wire.is_magne_header))[1]
    assert persistent["delivery_mode"] == b"\x02"
    bare = properties.splice(original, {wire.DROPPED: "x"}, wire.is_magne_header, keep_user_headers=False)
    assert [k for k, _ in properties.table_entries(properties.split(bare)[1]["headers"])] == [wire.DROPPED]


def test_splice_adds_a_table_to_a_header_without_one():
    original = codec.header_payload(commands.Basic.Properties(message_id="m"), 9)
    assert "headers" not in properties.split(original)[1]
    out = properties.splice(original, {wire.RETRIES: 1}, wire.is_magne_header)
    props = codec.decode_properties(out)
    assert props.headers == {wire.RETRIES: 1} and props.message_id == "m" and props.delivery_mode == 2


# -- malformed input -------------------------------------------------------------------------------------
def test_every_truncation_of_a_header_is_a_frame_error():
    original = hand_payload([DOUBLE_01, OLD_RETRIES, USER])
    for n in range(len(original)):
        with pytest.raises(FrameError):
            properties.split(original[:n])
        with pytest.raises(FrameError):
            properties.splice(original[:n], {wire.RETRIES: 1}, wire.is_magne_header)


@pytest.mark.parametrize("table", [
    struct.pack(">I", 3) + b"\x01aZ",  # unknown type tag
    struct.pack(">I", 3) + b"\x01a\x00",  # NUL tag (pamqp reads it as void; magne refuses)
    struct.pack(">I", 10) + b"\x01al" + b"\x00" * 7,  # a 64-bit value one byte short of the table's end
    struct.pack(">I", 12) + b"\x01aS" + struct.pack(">I", 100) + b"abc",  # long string longer than the table
    struct.pack(">I", 5) + b"\x09abc",  # key longer than the table
    struct.pack(">I", 1) + b"\x01",  # key length and nothing else
    b"\x00\x00",  # no length
    b"",
])
def test_malformed_tables_are_frame_errors(table):
    with pytest.raises(FrameError):
        properties.table_entries(table)


def test_table_shorter_than_its_length_field_is_a_frame_error():
    table = struct.pack(">I", 11) + b"\x01al" + b"\x00\x00"  # declares 11 bytes, 5 present: 'l' needs 8 more
    try:
        entries = properties.table_entries(table)
    except FrameError:
        return
    raise AssertionError(f"returned {entries!r}")


def test_bad_tag_inside_a_header_is_a_frame_error_for_splice():
    original = hand_payload([DOUBLE_01, b"\x01zQ\x00"])
    with pytest.raises(FrameError):
        properties.splice(original, {}, wire.is_magne_header)


@settings(max_examples=300, deadline=None)
@given(data=st.binary(max_size=80))
def test_random_bytes_never_raise_anything_but_frame_error(data):
    for fn in (properties.split, properties.table_entries):
        try:
            fn(data)
        except FrameError:
            pass
    try:
        properties.splice(data, {wire.RETRIES: 1}, wire.is_magne_header)
    except FrameError:
        pass


@settings(max_examples=200, deadline=None)
@given(props=basic_properties(), cut=st.integers(0, 400), junk=st.binary(min_size=1, max_size=3))
def test_corrupted_real_headers_never_raise_anything_but_frame_error(props, cut, junk):
    payload = codec.header_payload(props, 5)
    cut = min(cut, len(payload))
    bad = payload[:cut] + junk + payload[cut + len(junk):]
    try:
        out = properties.splice(bad, {wire.RETRIES: 1}, wire.is_magne_header)
    except FrameError:
        return
    assert properties.split(out)[0] == properties.split(bad)[0]


# -- wire.copy_header ------------------------------------------------------------------------------------
FRAME_MAX = 131072


def add_for_dead(traceback_chars: int = 8192, history: int = 20, message_chars: int = 4096) -> dict:
    return {
        wire.REASON: "task raised", wire.QUEUE: "q", wire.TASK: "t", wire.RETRIES: 2,
        wire.ERROR_TYPE: "ValueError", wire.ERROR_MESSAGE: "m" * message_chars,
        wire.ERROR_TRACEBACK: "Traceback (most recent call last):\n" + "t" * traceback_chars,
        wire.HISTORY: [{"attempt": i + 1, "reason": "task raised", "error-type": "ValueError",
                        "error-message": "e" * 512, "at": 1_700_000_000} for i in range(history)],
    }


def test_copy_header_keeps_publisher_headers_that_fit_bit_exact():
    original = hand_payload([DOUBLE_01, OLD_RETRIES, DOUBLE_BIG, USER])
    out = wire.copy_header(original, add_for_dead(), FRAME_MAX)
    assert len(out) <= FRAME_MAX - 8
    entries = properties.table_entries(properties.split(out)[1]["headers"])
    assert [e for _, e in entries[:3]] == [DOUBLE_01, DOUBLE_BIG, USER]
    headers = codec.decode_properties(out).headers
    assert wire.DROPPED not in headers
    assert headers[wire.ERROR_TRACEBACK] == add_for_dead()[wire.ERROR_TRACEBACK]  # nothing needed trimming
    assert len(headers[wire.HISTORY]) == 20


def test_copy_header_with_130kb_of_publisher_headers_fits_and_says_what_it_dropped():
    original = codec.header_payload(commands.Basic.Properties(
        message_id="big-1", headers={f"h{i}": "x" * 1300 for i in range(100)}), 10)
    assert 130_000 < len(original) < FRAME_MAX - 8
    out = wire.copy_header(original, add_for_dead(), FRAME_MAX)
    assert len(out) <= FRAME_MAX - 8
    props = codec.decode_properties(out)
    assert props.message_id == "big-1" and props.delivery_mode == 2
    assert not any(k.startswith("h") for k in props.headers)
    assert "100 publisher headers" in props.headers[wire.DROPPED]
    assert props.headers[wire.REASON] == "task raised"
    assert properties.split(out)[0] == 10
    # and it can be framed
    codec.encode_publish(1, "", "q.dead", b"0123456789", out, FRAME_MAX)


@pytest.mark.parametrize("frame_max", [4096, 8192, 131072])
def test_copy_header_with_a_huge_traceback_trims_it_and_keeps_user_headers(frame_max):
    original = hand_payload([DOUBLE_01, USER])
    add = add_for_dead(traceback_chars=200_000, history=20, message_chars=100_000)
    out = wire.copy_header(original, add, frame_max)
    assert len(out) <= frame_max - 8
    headers = codec.decode_properties(out).headers
    if frame_max == 131072:  # the trimmed traceback and history fit beside the publisher's headers
        assert wire.DROPPED not in headers
        assert headers["user"] == "alice"
        assert headers[wire.ERROR_TRACEBACK].endswith("t" * 100)
        assert len(headers[wire.ERROR_TRACEBACK]) <= 1024 and len(headers[wire.HISTORY]) == 3
    assert headers[wire.REASON] == "task raised"


def test_copy_header_of_an_unreadable_original_still_fits():
    original = b"\x00\x3c\x00\x00" + (77).to_bytes(8, "big") + b"\xff\xfe\x01"  # flags promise more than is there
    out = wire.copy_header(original, add_for_dead(), FRAME_MAX)
    props = codec.decode_properties(out)
    assert props.delivery_mode == 2 and "could not be read" in props.headers[wire.DROPPED]
    assert properties.split(out)[0] == 77


def test_copy_header_last_resort_when_magnes_own_headers_are_too_big():
    add = {**add_for_dead(), wire.TASK: "n" * 200_000}
    out = wire.copy_header(hand_payload([USER]), add, 8192)
    assert len(out) <= 8192 - 8
    headers = codec.decode_properties(out).headers
    assert headers[wire.TASK] == "n" * 200 and wire.HISTORY not in headers


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(frame_max=st.integers(4096, 140_000), n_headers=st.integers(0, 120), header_len=st.integers(0, 2000),
       tb=st.integers(0, 50_000), hist=st.integers(0, 25))
def test_copy_header_always_fits(frame_max, n_headers, header_len, tb, hist):
    original = codec.header_payload(commands.Basic.Properties(
        message_id="m", headers={f"h{i}": "x" * header_len for i in range(n_headers)} or None), 3)
    out = wire.copy_header(original, add_for_dead(traceback_chars=tb, history=hist), frame_max)
    assert len(out) + codec.FRAME_OVERHEAD <= frame_max
    headers = codec.decode_properties(out).headers
    assert headers[wire.REASON] == "task raised"
    if len(original) + 8 + 12_000 + hist * 600 < frame_max:
        assert wire.DROPPED not in headers
        assert sum(k.startswith("h") for k in headers) == n_headers
