"""magne.amqp.outbox.Outbox: ordered, complete delivery under partial sends, without re-copying large buffers."""

from __future__ import annotations

import random

from hypothesis import given, settings
from hypothesis import strategies as st

from magne.amqp.outbox import Outbox


class FakeSocket:
    """A send() that takes 0..N bytes per call, as a non-blocking socket does."""

    def __init__(self, takes: list[int]) -> None:
        self.takes = takes
        self.i = 0
        self.got = bytearray()
        self.calls: list[memoryview] = []

    def send(self, view: memoryview) -> int:
        assert isinstance(view, memoryview)
        self.calls.append(view)
        n = min(len(view), self.takes[self.i % len(self.takes)])
        self.i += 1
        self.got += view[:n]
        return n


@settings(max_examples=200, deadline=None)
@given(
    ops=st.lists(st.one_of(st.binary(max_size=300).map(lambda b: ("w", b)), st.just(("f", b""))), max_size=40),
    takes=st.lists(st.integers(0, 500), min_size=1, max_size=10),
)
def test_random_writes_and_partial_sends_deliver_everything_in_order(ops, takes):
    box = Outbox()
    sock = FakeSocket(takes)
    written = bytearray()
    for kind, data in ops:
        if kind == "w":
            box.write(data)
            written += data
        else:
            before = box.size
            sent = box.flush(sock.send)
            assert box.size == before - sent
        assert box.size == len(written) - len(sock.got)
        assert bool(box) == (box.size > 0)
        assert bytes(sock.got) == bytes(written[: len(sock.got)])
    # drain with a socket that always takes something
    drain = FakeSocket([max(1, t) for t in takes])
    while box:
        box.flush(drain.send)
    assert bytes(sock.got + drain.got) == bytes(written)
    assert box.size == 0 and box.flush(drain.send) == 0


def test_flush_stops_when_the_socket_is_full_and_resumes():
    box = Outbox()
    box.write(b"abc")
    box.write(b"defgh")
    full = FakeSocket([2, 0])
    assert box.flush(full.send) == 2
    assert box.size == 6 and bytes(full.got) == b"ab"
    box.write(b"ij")  # written while a partly sent buffer is pending: goes after it
    rest = FakeSocket([1000])
    assert box.flush(rest.send) == 8
    assert bytes(full.got + rest.got) == b"abcdefghij"
    assert not box


def test_empty_writes_are_ignored():
    box = Outbox()
    box.write(b"")
    assert not box and box.size == 0
    calls = FakeSocket([10])
    assert box.flush(calls.send) == 0 and calls.calls == []


def test_clear_forgets_everything():
    box = Outbox()
    box.write(b"x" * 100)
    box.flush(FakeSocket([10, 0]).send)
    box.clear()
    assert box.size == 0 and not box
    box.write(b"new")
    s = FakeSocket([100])
    box.flush(s.send)
    assert bytes(s.got) == b"new"


def test_a_6mb_body_drained_4kb_at_a_time_is_never_copied_again():
    body = random.Random(6).randbytes(6 << 20)
    box = Outbox()
    box.write(b"head")
    box.write(body)
    box.write(b"tail")
    expected = b"head" + body + b"tail"
    sock = FakeSocket([4096, 4096, 0])  # the socket fills up every third call: many flushes
    flushes = 0
    while box:
        box.flush(sock.send)
        flushes += 1
        assert box.size == len(expected) - len(sock.got)
    assert bytes(sock.got) == expected
    assert flushes >= len(expected) // 8192  # two 4 KB sends per flush, then the socket is full
    # every send was handed a view into one and the same buffer (joined once), never a fresh copy or slice
    bases = {id(v.obj) for v in sock.calls}
    assert len(bases) == 1
    assert all(v.obj is sock.calls[0].obj for v in sock.calls)
    # each view starts where the previous send stopped: offsets advance, nothing is re-sent
    assert sum(min(len(v), 4096) for v in sock.calls if len(v)) >= len(expected)


def test_small_frames_are_joined_into_one_send():
    box = Outbox()
    for i in range(100):
        box.write(bytes([i]) * 21)  # acks are 21 bytes
    sock = FakeSocket([1 << 20])
    assert box.flush(sock.send) == 2100
    assert len(sock.calls) == 1
