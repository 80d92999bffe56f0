"""magne.wire (body decoding, content-encoding, validated x-magne-* state) and magne.policy.decide."""

from __future__ import annotations

import json
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pamqp import commands
from pamqp import encode as pencode

from magne import task, testing, topology, wire
from magne.amqp import codec, properties
from magne.delivery import Delivery, Outcome
from magne.errors import BadMessage, TimeLimitExceeded
from magne.policy import Failure, RetryPolicy, decide

FRAME_MAX = 131072


# -- the body ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("value", [18446744073709551616, -18446744073709551617, 2**64 - 1, 2**63, -(2**63), 10**40])
def test_integers_outside_64_bits_stay_exact(value):
    func, args, kwargs = wire.decode(b'{"func":"f","args":[%d]}' % value)
    assert args == [value] and type(args[0]) is int


def test_big_integer_nested_in_kwargs():
    body = b'{"func":"f","args":[],"kwargs":{"a":{"b":[1,{"c":%d}]},"s":"12345678901234567890"}}' % 10**30
    _, _, kwargs = wire.decode(body)
    assert kwargs["a"]["b"][1]["c"] == 10**30 and type(kwargs["a"]["b"][1]["c"]) is int
    assert kwargs["s"] == "12345678901234567890"


def test_19_digit_integers_below_int64_stay_exact():
    _, args, _ = wire.decode(b'{"func":"f","args":[-9223372036854775809, -9999999999999999999]}')
    assert args == [-9223372036854775809, -9999999999999999999] and all(type(a) is int for a in args)


@pytest.mark.parametrize("constant", [b"NaN", b"Infinity", b"-Infinity"])
@pytest.mark.parametrize("slow_path", [False, True])
def test_nan_and_infinity_are_not_json(constant, slow_path):
    extra = b',"big":18446744073709551616' if slow_path else b""
    with pytest.raises(BadMessage, match="not JSON"):
        wire.decode(b'{"func":"f","args":[' + constant + b"]" + extra + b"}")


def test_a_float_overflowing_to_infinity_is_refused_on_the_fast_path():
    with pytest.raises(BadMessage):
        wire.decode(b'{"func":"f","args":[1e400]}')


def test_a_float_overflowing_to_infinity_is_refused_on_the_slow_path():
    try:
        _, args, _ = wire.decode(b'{"func":"f","args":[1e400, 18446744073709551616]}')
    except BadMessage:
        return
    raise AssertionError(f"decoded {args!r}")


def test_ordinary_bodies_never_touch_the_standard_library(monkeypatch):
    def boom(*_a, **_k):
        raise AssertionError("json.loads called on the fast path")

    monkeypatch.setattr(wire.json, "loads", boom)
    assert wire.decode(b'{"func":"add","args":[1,2.5,"x",null,true,922337203685477580],"kwargs":{"k":[]}}') == (
        "add", [1, 2.5, "x", None, True, 922337203685477580], {"k": []})
    with pytest.raises(AssertionError, match="fast path"):  # and the slow path does use it
        wire.decode(b'{"func":"f","args":[18446744073709551616]}')


@pytest.mark.parametrize(("body", "match"), [
    (b"not json", "not JSON"),
    (b"[1,2]", "not an object"),
    (b'{"args":[]}', "func"),
    (b'{"func":1}', "func"),
    (b'{"func":"f","args":{"a":1}}', "args"),
    (b'{"func":"f","kwargs":[1]}', "kwargs"),
    (b"\xff\xfe", "not JSON"),
    (b"\xff" + b"1" * 25, "not JSON"),  # invalid UTF-8 on the slow path too
    (b"[" * 100_000, "not JSON"),
    (b'{"a":' * 5000 + b"18446744073709551616" + b"}" * 5000, "not JSON"),  # deep nesting on the slow path
])
def test_malformed_bodies_are_bad_messages(body, match):
    with pytest.raises(BadMessage, match=match):
        wire.decode(body)


def test_args_and_kwargs_default_to_empty():
    assert wire.decode(b'{"func":"f"}') == ("f", [], {})
    assert wire.decode(b'{"func":"f","args":null,"kwargs":null}') == ("f", [], {})


def test_encode_big_integers_round_trip():
    body = wire.encode("f", [2**64, -(2**70)], {"k": {"deep": [10**30]}}, message_id="id-1")
    assert wire.decode(body) == ("f", [2**64, -(2**70)], {"k": {"deep": [10**30]}})
    assert json.loads(body)["id"] == "id-1"
    small = wire.encode("g", (1, "ü"))
    assert small == b'{"func":"g","args":[1,"\xc3\xbc"]}'


@pytest.mark.parametrize("bad", [[object()], [{1, 2}], [2**64, float("inf")], [2**64, object()]])
def test_encode_refuses_what_is_not_json(bad):
    with pytest.raises(TypeError, match="not JSON-serializable"):
        wire.encode("f", bad)


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
def test_encode_refuses_nan_and_infinity(value):
    try:
        body = wire.encode("f", [value])
    except TypeError:
        return
    raise AssertionError(f"encoded as {body!r}")


# -- content-encoding -----------------------------------------------------------------------------------------
def header(**props) -> bytes:
    return codec.header_payload(commands.Basic.Properties(**props), 10)


@pytest.mark.parametrize("enc", [None, "utf-8", "UTF-8", "utf8", "identity", " identity "])
def test_plain_encodings_are_accepted(enc):
    wire.check_encoding(header(content_type="application/json", content_encoding=enc))


@pytest.mark.parametrize("enc", ["gzip", "deflate", "br", "x" * 200])
def test_other_encodings_are_bad_messages(enc):
    with pytest.raises(BadMessage, match="content-encoding") as info:
        wire.check_encoding(header(content_encoding=enc))
    assert len(str(info.value)) < 200


def test_unreadable_encoding_is_a_bad_message():
    # content-encoding is present, but the headers table after it has an unknown type tag
    bad = properties.join(10, {"content_encoding": b"\x04gzip", "headers": struct.pack(">I", 3) + b"\x01aZ"})
    with pytest.raises(BadMessage, match="unreadable"):
        wire.check_encoding(bad)
    wire.check_encoding(b"")  # nothing at all: no encoding named


# -- x-magne-* state -----------------------------------------------------------------------------------------------
def raw_headers(*entries: bytes, message_id: str | None = None) -> bytes:
    raw = {"headers": struct.pack(">I", sum(map(len, entries))) + b"".join(entries)}
    if message_id is not None:
        raw["message_id"] = pencode.short_string(message_id)
    return properties.join(10, raw)


def entry(key: str, value) -> bytes:
    return pencode.short_string(key) + pencode.encode_table_value(value)


RETRIES_KEY = pencode.short_string(wire.RETRIES)


@pytest.mark.parametrize("raw", [
    RETRIES_KEY + b"S" + struct.pack(">I", 19) + b"9223372036854775807",  # a string
    RETRIES_KEY + b"L" + struct.pack(">Q", 2**63),  # 2**63 as unsigned 64 bits
    RETRIES_KEY + b"l" + struct.pack(">q", 2**63 - 1),
    RETRIES_KEY + b"d" + struct.pack(">d", 2.0**63),
    RETRIES_KEY + b"I" + struct.pack(">i", -1_000_000),
    RETRIES_KEY + b"t\x01",  # True
    RETRIES_KEY + b"f" + struct.pack(">f", 1.5),
    RETRIES_KEY + b"I" + struct.pack(">i", wire.MAX_RETRIES_VALUE + 1),
], ids=["string", "2**63-unsigned", "int64-max", "double-2**63", "-1000000", "true", "float-1.5", "max+1"])
def test_retry_counts_magne_never_wrote_are_zero_with_a_warning(raw):
    st_ = wire.read_state(raw_headers(raw))
    assert st_.retries == 0
    assert len(st_.warnings) == 1 and wire.RETRIES in st_.warnings[0]
    assert "\n" not in st_.warnings[0] and len(st_.warnings[0]) < 300


def test_a_void_retry_count_is_absent():
    assert wire.read_state(raw_headers(RETRIES_KEY + b"V")) == wire.State()


@pytest.mark.parametrize("n", [0, 1, 7, wire.MAX_RETRIES_VALUE])
def test_valid_retry_counts_are_read(n):
    st_ = wire.read_state(raw_headers(entry(wire.RETRIES, n), message_id="mid"))
    assert (st_.retries, st_.warnings, st_.message_id) == (n, [], "mid")


def history_entry(attempt: int = 1, message: str = "boom", at: int = 1_700_000_000, **over) -> dict:
    e = {"attempt": attempt, "reason": "task raised", "error-type": "ValueError", "error-message": message, "at": at}
    e.update(over)
    return e


def test_history_keeps_valid_entries_and_drops_malformed_ones():
    good1, good2 = history_entry(1), history_entry(2, message="y" * wire.HISTORY_MESSAGE_CHARS)
    no_at = history_entry(4)
    del no_at["at"]
    items = [
        pencode.encode_table_value(good1),
        b"d" + struct.pack(">d", 1e300),  # a double, not a table
        pencode.encode_table_value("not a table"),
        pencode.encode_table_value(history_entry(3) | {"at": "soon"}),
        pencode.encode_table_value(no_at),
        pencode.encode_table_value(history_entry(5, at=2**50)),  # absurd time
        pencode.encode_table_value(history_entry(-1)),
        pencode.encode_table_value(good2),
    ]
    # one entry whose "at" is the double 1e300, written by hand (pamqp would write a float32)
    bad_at = (pencode.short_string("attempt") + b"b\x06" + pencode.short_string("reason") + pencode.encode_table_value("r")
              + pencode.short_string("error-type") + pencode.encode_table_value("E")
              + pencode.short_string("error-message") + pencode.encode_table_value("m")
              + pencode.short_string("at") + b"d" + struct.pack(">d", 1e300))
    items.append(b"F" + struct.pack(">I", len(bad_at)) + bad_at)
    array = b"".join(items)
    hist = pencode.short_string(wire.HISTORY) + b"A" + struct.pack(">I", len(array)) + array
    st_ = wire.read_state(raw_headers(hist, entry(wire.RETRIES, 2)))
    assert st_.retries == 2
    assert [h["attempt"] for h in st_.history] == [1, 2]
    assert st_.history[0] == good1
    assert st_.history[1] == good2
    assert len(st_.warnings) == 1 and "7 malformed" in st_.warnings[0]


def test_history_entries_with_fields_longer_than_magne_writes_are_dropped():
    long_ones = [history_entry(1, reason="r" * 65), history_entry(2, **{"error-type": "T" * 201}),
                 history_entry(3, message="m" * (wire.HISTORY_MESSAGE_CHARS + 1))]
    st_ = wire.read_state(raw_headers(entry(wire.HISTORY, [*long_ones, history_entry(4)])))
    assert [h["attempt"] for h in st_.history] == [4]
    assert len(st_.warnings) == 1 and "3 malformed" in st_.warnings[0]


@pytest.mark.parametrize("value", [
    b"d" + struct.pack(">d", 1e300),
    b"S" + struct.pack(">I", 10_000) + b"h" * 10_000,
    b"F" + pencode.field_table({"attempt": 1}),
], ids=["double-1e300", "string-10kb", "table"])
def test_a_history_that_is_not_a_list_is_reported(value):
    st_ = wire.read_state(raw_headers(pencode.short_string(wire.HISTORY) + value))
    assert st_.history == []
    assert any(wire.HISTORY in w for w in st_.warnings), st_.warnings


def test_unreadable_properties_are_a_first_attempt_with_a_warning():
    for bad in (b"", b"\x00\x3c\x00\x00", raw_headers(RETRIES_KEY + b"Z\x00"), b"\x00" * 12 + b"\x20\x00\xff\xff"):
        st_ = wire.read_state(bad)
        assert (st_.retries, st_.history, st_.message_id) == (0, [], None)
        assert len(st_.warnings) == 1 and "cannot be decoded" in st_.warnings[0]


@settings(max_examples=200, deadline=None)
@given(data=st.binary(max_size=120))
def test_read_state_never_raises(data):
    st_ = wire.read_state(data)
    assert type(st_.retries) is int and 0 <= st_.retries <= wire.MAX_RETRIES_VALUE


# -- policy.decide -------------------------------------------------------------------------------------------------
def delivery(hdr: bytes, queue: str = "q") -> Delivery:
    d = Delivery(5, 1, queue, b'{"func":"t"}', hdr, False)
    d.task = "t"
    return d


def copy_headers(d: Delivery) -> dict:
    assert len(d.copy_header) + 8 <= FRAME_MAX
    return codec.decode_properties(d.copy_header).headers


PUBLISHER = properties.join(12, {
    "message_id": pencode.short_string("pub-1"),
    "headers": (lambda e: struct.pack(">I", len(e)) + e)(
        pencode.short_string("ratio") + b"d" + struct.pack(">d", 0.1)
        + entry("x-magne-reason", "forged") + entry("tenant", "acme")),
})


def test_two_retries_then_dead():
    policy = RetryPolicy(max_retries=2, min_backoff=1.0, max_backoff=60.0)
    hdr = PUBLISHER
    for attempt in (1, 2):
        d = delivery(hdr)
        warnings = decide(d, Failure("task raised", ValueError(f"boom {attempt}")), policy, FRAME_MAX, now=1000 + attempt)
        assert warnings == []
        assert d.outcome is Outcome.RETRY
        ceiling = min(60.0, 2.0 ** attempt)  # the first retry waits between min_backoff and twice that
        assert max(1.0, ceiling / 2) <= d.delay <= ceiling
        ms = topology.delay_ms(d.delay)
        assert d.copy_to == f"q.wait.{ms}" == topology.delay_queue("q", ms)
        assert isinstance(d.copy_declare, commands.Queue.Declare) and d.copy_declare.queue == d.copy_to
        assert d.copy_declare.arguments["x-dead-letter-routing-key"] == "q.due"  # falls due beside the queue
        h = copy_headers(d)
        assert h[wire.RETRIES] == attempt
        assert [e["attempt"] for e in h[wire.HISTORY]] == list(range(1, attempt + 1))
        assert h[wire.HISTORY][-1]["error-message"] == f"boom {attempt}"
        assert h[wire.HISTORY][-1]["at"] == 1000 + attempt
        assert h["tenant"] == "acme" and "x-magne-reason" not in h  # the forged one is gone
        assert b"\x05ratiod" + struct.pack(">d", 0.1) in d.copy_header  # bit-exact
        assert codec.decode_properties(d.copy_header).message_id == "pub-1"
        hdr = d.copy_header  # the copy comes back from the delay queue
    d = delivery(hdr)
    decide(d, Failure("task raised", ValueError("boom 3")), policy, FRAME_MAX, queue_type="quorum", now=1003)
    assert d.outcome is Outcome.DEAD
    assert d.copy_to == "q.dead"
    assert d.copy_declare.queue == "q.dead" and d.copy_declare.arguments == {"x-queue-type": "quorum"}
    h = copy_headers(d)
    assert h[wire.REASON] == "task raised" and h[wire.QUEUE] == "q" and h[wire.TASK] == "t"
    assert h[wire.ERROR_TYPE] == "ValueError" and h[wire.ERROR_MESSAGE] == "boom 3"
    assert "ValueError: boom 3" in h[wire.ERROR_TRACEBACK]
    assert h[wire.RETRIES] == 2
    assert [e["attempt"] for e in h[wire.HISTORY]] == [1, 2, 3]
    assert d.reason == "task raised" and d.error["type"] == "ValueError"


def test_not_retryable_is_dead_at_once_without_traceback():
    d = delivery(PUBLISHER)
    decide(d, Failure("bad message", BadMessage("body is not JSON"), retryable=False), RetryPolicy(max_retries=5),
           FRAME_MAX)
    assert d.outcome is Outcome.DEAD and d.copy_to == "q.dead"
    h = copy_headers(d)
    assert wire.ERROR_TRACEBACK not in h and "traceback" not in d.error
    assert h[wire.REASON] == "bad message" and h[wire.RETRIES] == 0 and len(h[wire.HISTORY]) == 1


@pytest.mark.parametrize(("policy", "exc", "outcome"), [
    (None, ValueError("x"), Outcome.DEAD),
    (RetryPolicy(max_retries=0), ValueError("x"), Outcome.DEAD),
    (RetryPolicy(max_retries=3, retry_on=(KeyError,)), ValueError("x"), Outcome.DEAD),
    (RetryPolicy(max_retries=3, retry_on=(KeyError,)), KeyError("x"), Outcome.RETRY),
    (RetryPolicy(max_retries=3), TimeLimitExceeded(), Outcome.RETRY),
])
def test_what_is_retried(policy, exc, outcome):
    d = delivery(PUBLISHER)
    decide(d, Failure("task raised", exc), policy, FRAME_MAX)
    assert d.outcome is outcome


@pytest.mark.parametrize("forged", [
    RETRIES_KEY + b"I" + struct.pack(">i", -1_000_000),
    RETRIES_KEY + b"l" + struct.pack(">q", -(2**63)),
    RETRIES_KEY + b"S" + struct.pack(">I", 2) + b"-5",
], ids=["-1000000", "int64-min", "string"])
def test_negative_retry_counts_grant_no_extra_retries(forged):
    policy = RetryPolicy(max_retries=2)
    hdr = raw_headers(forged)
    outcomes = []
    for _ in range(5):
        d = delivery(hdr)
        warnings = decide(d, Failure("task raised", RuntimeError("x")), policy, FRAME_MAX)
        outcomes.append(d.outcome)
        if d.outcome is Outcome.DEAD:
            break
        hdr = d.copy_header
        if len(outcomes) == 1:
            assert warnings and wire.RETRIES in warnings[0]
    assert outcomes == [Outcome.RETRY, Outcome.RETRY, Outcome.DEAD]


def test_the_history_stays_bounded():
    policy = RetryPolicy(max_retries=100, min_backoff=0.001, max_backoff=0.002)
    hdr = PUBLISHER
    for _ in range(30):
        d = delivery(hdr)
        decide(d, Failure("task raised", RuntimeError("x" * 5000)), policy, FRAME_MAX)
        hdr = d.copy_header
    h = copy_headers(d)
    assert h[wire.RETRIES] == 30 and len(h[wire.HISTORY]) == wire.HISTORY_KEEP
    assert h[wire.HISTORY][-1]["attempt"] == 30


@settings(max_examples=150, deadline=None)
@given(hdr=st.binary(max_size=200), retryable=st.booleans(), frame_max=st.sampled_from([4096, 131072]))
def test_decide_never_raises_on_garbage_headers(hdr, retryable, frame_max):
    d = delivery(hdr)
    decide(d, Failure("task raised", ValueError("x" * 10_000), retryable), RetryPolicy(max_retries=1), frame_max)
    assert d.outcome in (Outcome.RETRY, Outcome.DEAD)
    assert len(d.copy_header) + 8 <= frame_max
    props = codec.decode_properties(d.copy_header)
    assert props.delivery_mode == 2 and isinstance(props.headers, dict)


# -- end to end, through the pool's own path (magne.testing: a broker adds nothing here) ---------------------
@task(max_retries=2, min_backoff=1, max_backoff=1, retry_on=(ConnectionError,))
def wp_retries_connection_errors_only(kind):
    raise {"conn": ConnectionError, "value": ValueError}[kind](kind)


@pytest.mark.parametrize("threads", [0, 4])
def test_retry_on_and_max_retries_end_to_end(threads):
    with testing.worker(threads, max_retries=10) as w:  # the task's max_retries=2 wins over the worker's 10
        wp_retries_connection_errors_only.send("conn")
        wp_retries_connection_errors_only.send("value")
        w.join()
    conn, value = sorted(w.dead_letters(), key=lambda r: r.args)
    assert conn.retries == 2 and [a["attempt"] for a in conn.attempts] == [1, 2, 3]
    assert {a["error-type"] for a in conn.attempts} == {"ConnectionError"} and conn.headers[wire.RETRIES] == 2
    assert value.retries == 0 and len(value.attempts) == 1  # not in retry_on: dead-lettered at once
    assert [r.delay for r in w.retried] == [pytest.approx(r.delay) for r in w.retried]
    assert all(r.delay == 1.0 for r in w.retried) and w.clock == 2.0  # min_backoff = max_backoff = 1: exactly 1 s


# -- --min-backoff is a minimum (issue 20) --------------------------------------------------------------------
@pytest.mark.parametrize(("low", "high"), [(1.0, 1.0), (1.0, 300.0), (0.1, 0.2), (5.0, 7.0)])
def test_a_backoff_is_never_below_min_backoff_nor_above_max_backoff(low, high):
    policy = RetryPolicy(max_retries=50, min_backoff=low, max_backoff=high)
    for done in range(20):
        for _ in range(50):
            assert low <= policy.backoff(done) <= high, (done, policy.backoff(done))


def test_min_backoff_equal_to_max_backoff_is_exactly_that_delay():
    assert {RetryPolicy(3, 1.0, 1.0).backoff(n) for n in range(3) for _ in range(20)} == {1.0}


def test_a_delay_is_rounded_up_to_its_delay_queue_step_never_down():
    for seconds in (0.0005, 0.05, 0.1234, 1.0, 1.234, 59.99, 300.0, 12345.6):
        ms = topology.delay_ms(seconds)
        assert ms >= seconds * 1000 and ms <= max(1, seconds * 1000) * 1.1 + 1


def test_the_longest_delay_fits_rabbitmqs_ttl_and_expiry_limit():
    ms = topology.delay_ms(topology.MAX_DELAY)
    declare = topology.declare_delay("q", ms)
    assert declare.arguments["x-message-ttl"] <= 2**32 - 1 and declare.arguments["x-expires"] <= 2**32 - 1
    with pytest.raises(ValueError, match="max_backoff"):
        RetryPolicy(1, 1.0, topology.MAX_DELAY * 2)
