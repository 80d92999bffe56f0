"""magne.engine.connection.Connection against a scripted peer: handshake, closes, heartbeats, framing.

No broker: tests/unit/peer.py listens on loopback, magne connects to it by address,
and the test thread drives both sides (pump/converse), so every byte-level case the
real broker cannot be made to produce is scripted here.
"""

from __future__ import annotations

import random
import select
import socket
import time

import pytest
from pamqp import body as pbody
from pamqp import commands
from pamqp import frame as pframe
from pamqp import header as pheader
from pamqp import heartbeat as pheartbeat
from peer import Peer, converse, pump

from magne.amqp import codec
from magne.amqp.errors import ChannelClosed, ConnectionClosed, ConnectionLost, FrameError
from magne.amqp.protocol import ProtocolError
from magne.amqp.url import parse_url
from magne.engine.connection import DEFAULT_FRAME_MAX, MIN_FRAME_MAX, Connection, State, negotiate


@pytest.fixture
def peer():
    p = Peer()
    yield p
    p.close()


def connect(peer: Peer, hb: int | None = None, **url: object) -> tuple[Connection, list[bool]]:
    conn = Connection(parse_url(peer.url(**url)), "unit", heartbeat=hb)
    opened: list[bool] = []
    conn.on_open = lambda: opened.append(True)
    conn.start(time.monotonic())
    peer.accept()
    return conn, opened


def handshake(peer: Peer, conn: Connection, frame_max: int = 131072, heartbeat: int = 60, channel_max: int = 2047,
              ) -> tuple[commands.Connection.TuneOk, commands.Connection.Open]:
    converse(conn, peer, bytes)
    peer.send(commands.Connection.Start(server_properties={"product": "peer"}, mechanisms="PLAIN AMQPLAIN"))
    converse(conn, peer, commands.Connection.StartOk)
    peer.send(commands.Connection.Tune(channel_max=channel_max, frame_max=frame_max, heartbeat=heartbeat))
    tune_ok = converse(conn, peer, commands.Connection.TuneOk)
    open_ = converse(conn, peer, commands.Connection.Open)
    return tune_ok, open_


def open_connection(peer: Peer, hb: int | None = None, frame_max: int = 131072, broker_heartbeat: int = 60,
                    **url: object) -> Connection:
    conn, opened = connect(peer, hb, **url)
    handshake(peer, conn, frame_max=frame_max, heartbeat=broker_heartbeat)
    peer.send(commands.Connection.OpenOk())
    pump(conn, until=lambda: bool(opened))
    assert conn.state is State.OPEN
    return conn


def open_channel(conn: Connection, peer: Peer, channel: int = 1) -> None:
    """Open `channel` (content and replies are only taken on an open channel)."""
    conn.call(channel, commands.Channel.Open(), (commands.Channel.OpenOk,))
    converse(conn, peer, commands.Channel.Open, channel=channel)
    peer.send(commands.Channel.OpenOk(), channel=channel)
    pump(conn, until=lambda: conn.is_open(channel))


def wait_readable(conn: Connection, timeout: float = 2.0) -> None:
    r, _, _ = select.select([conn.fileno()], [], [], timeout)
    assert r, "nothing arrived for magne"


def deliver_wire(tag: int, body: bytes, channel: int = 1, body_frames: int = 1, message_id: str = "m-1") -> bytes:
    out = [
        pframe.marshal(commands.Basic.Deliver("ctag", tag, False, "ex", "rk"), channel),
        pframe.marshal(pheader.ContentHeader(0, len(body), commands.Basic.Properties(message_id=message_id)), channel),
    ]
    step = max(1, -(-len(body) // body_frames))
    for i in range(0, len(body), step):
        out.append(pframe.marshal(pbody.ContentBody(body[i : i + step]), channel))
    return b"".join(out)


# -- the handshake -------------------------------------------------------------------------------------
def test_full_handshake(peer):
    conn, opened = connect(peer, user="alice", password="s3cret", vhost="v1")
    assert conn.state is State.CONNECTING
    header = converse(conn, peer, bytes)
    assert header == b"AMQP\x00\x00\x09\x01"
    assert conn.state is State.HANDSHAKE

    peer.send(commands.Connection.Start(server_properties={"product": "peer"}, mechanisms="AMQPLAIN PLAIN"))
    start_ok = converse(conn, peer, commands.Connection.StartOk)
    assert start_ok.mechanism == "PLAIN"
    assert start_ok.response == "\0alice\0s3cret"
    assert start_ok.locale == "en_US"
    props = start_ok.client_properties
    assert props["product"] == "magne"
    assert props["capabilities"]["authentication_failure_close"] is True
    assert props["capabilities"]["basic.nack"] is True
    assert props["capabilities"]["publisher_confirms"] is True
    assert props["connection_name"].startswith("unit pid=")
    assert conn.server_properties == {"product": "peer"}

    peer.send(commands.Connection.Tune(channel_max=100, frame_max=65536, heartbeat=30))
    tune_ok = converse(conn, peer, commands.Connection.TuneOk)
    assert (tune_ok.channel_max, tune_ok.frame_max, tune_ok.heartbeat) == (100, 65536, 30)
    open_ = converse(conn, peer, commands.Connection.Open)
    assert open_.virtual_host == "v1"
    assert (conn.channel_max, conn.frame_max, conn.heartbeat) == (100, 65536, 30)
    assert conn.decoder.max_frame == 65536
    assert conn.state is State.HANDSHAKE and not opened

    peer.send(commands.Connection.OpenOk())
    pump(conn, until=lambda: bool(opened))
    assert conn.state is State.OPEN and opened == [True]
    assert peer.frames() == []  # nothing else was written


def test_broker_without_plain_is_refused(peer):
    conn, _ = connect(peer)
    converse(conn, peer, bytes)
    peer.send(commands.Connection.Start(mechanisms="EXTERNAL"))
    with pytest.raises(ConnectionClosed) as info:
        pump(conn)
    assert "PLAIN" in str(info.value)


@pytest.mark.parametrize(("ours", "theirs", "default", "want"), [
    (0, 0, 131072, 131072),  # both "no limit": the default
    (0, 4096, 131072, 4096),
    (8192, 0, 131072, 8192),
    (8192, 65536, 131072, 8192),
    (65536, 8192, 131072, 8192),
    (0, 0, 65535, 65535),
])
def test_negotiate(ours, theirs, default, want):
    assert negotiate(ours, theirs, default) == want


def test_broker_frame_max_zero_takes_ours(peer):
    conn, _ = connect(peer)  # frame_max 131072 from the URL defaults
    tune_ok, _open = handshake(peer, conn, frame_max=0, channel_max=0)
    assert tune_ok.frame_max == 131072 and conn.frame_max == 131072 and conn.decoder.max_frame == 131072
    assert tune_ok.channel_max == 2047


def test_small_frame_max_from_the_url_is_raised_to_the_minimum(peer):
    conn, _ = connect(peer, frame_max=4096)
    tune_ok, _open = handshake(peer, conn, frame_max=131072)
    assert tune_ok.frame_max == MIN_FRAME_MAX == conn.frame_max


def test_frame_max_zero_from_both_sides_takes_the_default(peer):
    conn, _ = connect(peer, frame_max=0)
    tune_ok, _open = handshake(peer, conn, frame_max=0)
    assert tune_ok.frame_max == DEFAULT_FRAME_MAX == conn.frame_max


def test_frame_max_zero_in_url_takes_the_brokers(peer):
    conn, _ = connect(peer, frame_max=0)
    tune_ok, _open = handshake(peer, conn, frame_max=131072)
    assert tune_ok.frame_max == 131072 == conn.frame_max


@pytest.mark.parametrize(("ours", "theirs", "want"), [
    (0, 60, 0),  # we turn heartbeats off (the publishing link does): off, whatever the broker proposes
    (0, 0, 0),
    (60, 0, 60),  # the broker has none: ours
    (10, 60, 10),
    (60, 10, 10),
])
def test_heartbeat_negotiation(peer, ours, theirs, want):
    conn, _ = connect(peer, hb=ours)
    tune_ok, _open = handshake(peer, conn, heartbeat=theirs)
    assert tune_ok.heartbeat == want == conn.heartbeat


def test_heartbeat_from_the_url(peer):
    conn, _ = connect(peer, hb=None, heartbeat=7)
    tune_ok, _open = handshake(peer, conn, heartbeat=60)
    assert tune_ok.heartbeat == 7


# -- failures during the handshake ---------------------------------------------------------------------------
@pytest.mark.parametrize(("code", "after"), [(403, "start-ok"), (530, "open")])
def test_broker_close_during_handshake_is_permanent_and_answered(peer, code, after):
    conn, opened = connect(peer)
    converse(conn, peer, bytes)
    peer.send(commands.Connection.Start(mechanisms="PLAIN"))
    converse(conn, peer, commands.Connection.StartOk)
    if after == "open":
        peer.send(commands.Connection.Tune(channel_max=0, frame_max=131072, heartbeat=0))
        converse(conn, peer, commands.Connection.TuneOk)
        converse(conn, peer, commands.Connection.Open)
    text = "ACCESS_REFUSED - Login was refused" if code == 403 else "NOT_ALLOWED - vhost v not found"
    peer.send(commands.Connection.Close(code, text, 0, 0))
    with pytest.raises(ConnectionClosed) as info:
        pump(conn)
    exc = info.value
    assert exc.code == code and exc.text == text and exc.permanent is True
    assert conn.state is State.CLOSED and conn.sock is None and not opened
    peer.expect(commands.Connection.CloseOk, channel=0)  # the close-ok was written before the socket went
    assert peer.wait_eof()


def test_broker_close_while_open_is_not_permanent(peer):
    conn = open_connection(peer)
    peer.send(commands.Connection.Close(320, "CONNECTION_FORCED - shutdown", 0, 0))
    with pytest.raises(ConnectionClosed) as info:
        pump(conn)
    assert info.value.code == 320 and info.value.permanent is False
    peer.expect(commands.Connection.CloseOk)


def test_socket_dropped_after_start_ok_is_a_refused_login(peer):
    conn, _ = connect(peer, user="bob")
    converse(conn, peer, bytes)
    peer.send(commands.Connection.Start(mechanisms="PLAIN"))
    converse(conn, peer, commands.Connection.StartOk)
    peer.sock.close()
    peer.sock = None
    with pytest.raises(ConnectionClosed) as info:
        pump(conn)
    assert info.value.code == 403 and "login refused" in info.value.text and "'bob'" in info.value.text
    assert info.value.permanent is True


def test_socket_dropped_after_tune_is_not_a_refused_login(peer):
    conn, _ = connect(peer)
    handshake(peer, conn)  # start / start-ok / tune / tune-ok + open: the login was accepted
    peer.sock.close()
    peer.sock = None
    try:
        pump(conn)
    except ConnectionClosed as exc:
        raise AssertionError(f"reported as {exc} (permanent={exc.permanent})") from None
    except ConnectionLost as exc:
        assert exc.permanent is False


def test_socket_dropped_before_start_is_not_an_amqp_broker(peer):
    conn, _ = connect(peer)
    converse(conn, peer, bytes)
    peer.sock.close()
    peer.sock = None
    with pytest.raises(ConnectionLost) as info:
        pump(conn)
    assert not isinstance(info.value, ConnectionClosed) and info.value.permanent is False
    assert "did not answer as an AMQP 0-9-1 broker" in str(info.value)


def test_silent_peer_times_out_in_tick(peer):
    conn, _ = connect(peer, connection_timeout=300)
    assert conn.params.connect_timeout == pytest.approx(0.3)
    converse(conn, peer, bytes)
    t0 = time.monotonic()
    with pytest.raises(ConnectionLost) as info:
        pump(conn, timeout=3.0)
    waited = time.monotonic() - t0
    assert "no answer" in str(info.value) and "0.3s" in str(info.value)
    assert 0.15 <= waited <= 1.0
    # tick itself raises it (not a read): at the deadline, with nothing to read
    assert conn.tick(conn.deadline - 0.01) == conn.deadline
    with pytest.raises(ConnectionLost):
        conn.tick(conn.deadline)


def test_unreachable_port_is_connection_lost():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()  # nothing listens there now
    conn = Connection(parse_url(f"amqp://127.0.0.1:{port}/?connection_timeout=2000"), "unit")
    conn.start(time.monotonic())
    with pytest.raises(ConnectionLost) as info:
        pump(conn, timeout=3.0)
    assert "cannot reach the broker" in str(info.value)


# -- heartbeats ----------------------------------------------------------------------------------------------
def test_heartbeats_flow_and_silence_is_detected(peer):
    conn = open_connection(peer, hb=1)
    assert conn.heartbeat == 1
    opened_at = time.monotonic()
    seen: list[float] = []
    last_peer_beat = [opened_at]

    def each() -> None:
        now = time.monotonic()
        for _ch, f in peer.frames():
            assert isinstance(f, pheartbeat.Heartbeat), f
            seen.append(now)
        # keep magne alive for the first second with our own heartbeats, then go silent
        if now - opened_at < 1.0 and now - last_peer_beat[0] >= 0.4:
            peer.heartbeat()
            last_peer_beat[0] = now

    with pytest.raises(ConnectionLost) as info:
        pump(conn, each=each, timeout=6.0)
    died = time.monotonic()
    assert "missed heartbeats" in str(info.value)
    # the peer's heartbeats counted as traffic: the 2 s run from the last one, not from the open
    assert 1.8 <= died - last_peer_beat[0] <= 2.6, (died - opened_at, last_peer_beat[0] - opened_at)
    assert died - opened_at >= 2.5
    # magne wrote one every ~0.5 s all along, silent peer or not
    gaps = [b - a for a, b in zip([opened_at, *seen], seen, strict=False)]
    assert len(seen) >= 4, seen
    assert all(0.3 <= g <= 0.8 for g in gaps), gaps


def test_no_heartbeats_when_off(peer):
    conn = open_connection(peer, hb=0)
    assert conn.tick(time.monotonic() + 3600) is None
    assert not conn.outbox


def test_stalled_socket_does_not_grow_the_outbox_or_spin():
    """Regression: with the peer not reading, tick() queued a heartbeat per call and returned a past
    wake-up time, so the loop spun at 100 % CPU and the buffer grew 0.8 MB in 5 s."""
    peer = Peer(rcvbuf=32768)
    try:
        conn = open_connection(peer, hb=1)
        conn.sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 32768)
        conn.outbox.write(b"\x00" * (8 << 20))  # far more than both socket buffers hold
        for _ in range(100):
            conn.flush(time.monotonic())
            if not select.select([], [conn.fileno()], [], 0.05)[1]:
                break
        assert conn.outbox.size > 4 << 20
        size = conn.outbox.size
        start = time.monotonic()
        last_beat = start
        turns = ticks = 0
        while (now := time.monotonic()) - start < 2.0:
            turns += 1
            if now - last_beat >= 0.3:
                peer.heartbeat()  # the peer still talks, it just does not read
                last_beat = now
            for i in range(20):
                wake = conn.tick(now + i * 0.001)
                ticks += 1
                assert wake is not None and wake >= now + i * 0.001, (wake, now)
                assert conn.outbox.size == size, "tick() queued bytes behind a stalled socket"
            assert conn.events() & 2  # still waiting to write
            wait = min(wake - now, 0.3 - (now - last_beat), 2.0 - (now - start))
            r, w, _ = select.select([conn.fileno()], [conn.fileno()], [], max(0.0, wait))
            now = time.monotonic()
            if w:
                conn.on_writable(now)
            if r:
                conn.on_readable(now)
            assert conn.outbox.size <= size
            size = conn.outbox.size
        assert ticks >= 100
        # the loop slept until something happened: a few turns per peer heartbeat, not a spin
        assert turns < 100, turns
        assert conn.state is State.OPEN
    finally:
        peer.close()


# -- channels and calls ------------------------------------------------------------------------------------------
def test_channel_close_is_answered_and_raised_by_default(peer):
    conn = open_connection(peer)
    conn.call(1, commands.Channel.Open(), (commands.Channel.OpenOk,))
    converse(conn, peer, commands.Channel.Open, channel=1)
    peer.send(commands.Channel.Close(406, "PRECONDITION_FAILED - unknown delivery tag 7", 60, 80), channel=1)
    with pytest.raises(ChannelClosed) as info:
        pump(conn)
    assert (info.value.channel, info.value.code) == (1, 406) and "unknown delivery tag 7" in info.value.text
    assert conn.waiting(1) == 0  # the open's pending reply went with the channel
    converse(conn, peer, commands.Channel.CloseOk, channel=1)
    assert conn.state is State.OPEN  # only the channel closed


def test_channel_close_goes_to_the_handler(peer):
    conn = open_connection(peer)
    closed: list[tuple[int, ChannelClosed]] = []
    conn.on_channel_close = lambda ch, exc: closed.append((ch, exc))
    open_channel(conn, peer, 2)
    peer.send(commands.Channel.Close(404, "NOT_FOUND - no queue 'q'", 50, 10), channel=2)
    pump(conn, until=lambda: bool(closed))
    assert closed[0][0] == 2 and closed[0][1].code == 404
    converse(conn, peer, commands.Channel.CloseOk, channel=2)


def test_pipelined_calls_get_their_replies_in_order(peer):
    conn = open_connection(peer)
    got: list[tuple[str, object]] = []
    other: list[object] = []
    conn.on_frame = lambda ch, f: other.append(f)
    conn.call(1, commands.Channel.Open(), (commands.Channel.OpenOk,), lambda f: got.append(("open", f)))
    conn.call(1, commands.Basic.Qos(prefetch_count=5), (commands.Basic.QosOk,), lambda f: got.append(("qos", f)))
    conn.call(1, commands.Queue.Declare(queue="q"), (commands.Queue.DeclareOk,), lambda f: got.append(("declare", f)))
    assert conn.waiting(1) == 3
    converse(conn, peer, commands.Channel.Open, channel=1)
    converse(conn, peer, commands.Basic.Qos, channel=1)
    declare = converse(conn, peer, commands.Queue.Declare, channel=1)
    assert declare.queue == "q"
    peer.send(commands.Channel.OpenOk(), commands.Basic.QosOk(), commands.Queue.DeclareOk("q", 3, 1), channel=1)
    pump(conn, until=lambda: len(got) == 3)
    assert [name for name, _ in got] == ["open", "qos", "declare"]
    assert got[2][1].message_count == 3
    assert conn.waiting(1) == 0 and other == []
    # a reply nobody waits for is a protocol error: the connection cannot be trusted
    peer.send(commands.Basic.ConsumeOk("x"), channel=1)
    with pytest.raises(ProtocolError, match="ConsumeOk"):
        pump(conn, timeout=1.0)
    assert other == []


def test_blocked_and_unblocked(peer):
    conn = open_connection(peer)
    seen: list[tuple[bool, str]] = []
    conn.on_blocked = lambda b, why: seen.append((b, why))
    peer.send(commands.Connection.Blocked("low on memory"))
    pump(conn, until=lambda: bool(seen))
    assert conn.blocked and seen == [(True, "low on memory")]
    peer.send(commands.Connection.Unblocked())
    pump(conn, until=lambda: len(seen) == 2)
    assert not conn.blocked


def test_polite_close(peer):
    conn = open_connection(peer)
    conn.close(time.monotonic(), "bye")
    assert conn.state is State.CLOSING
    close = converse(conn, peer, commands.Connection.Close)
    assert (close.reply_code, close.reply_text) == (200, "bye")
    peer.send(commands.Connection.CloseOk())
    pump(conn, until=lambda: conn.state is State.CLOSED)
    assert conn.sock is None


def test_close_without_an_answer_is_dropped_at_the_deadline(peer):
    conn = open_connection(peer)
    now = time.monotonic()
    conn.close(now)
    assert conn.tick(now) == conn.deadline
    assert conn.tick(conn.deadline) is None
    assert conn.state is State.CLOSED and conn.sock is None


# -- framing ------------------------------------------------------------------------------------------------------
def _oversized(size: int) -> bytes:
    body = b"b" * size
    return (pframe.marshal(commands.Basic.Deliver("c", 1, False, "", "q"), 1)
            + pframe.marshal(pheader.ContentHeader(0, len(body), commands.Basic.Properties()), 1)
            + pframe.marshal(pbody.ContentBody(body), 1))


def test_frame_larger_than_frame_max_cut_by_recv_is_a_frame_error(peer):
    conn = open_connection(peer, frame_max=8192)
    open_channel(conn, peer)
    assert conn.decoder.max_frame == 8192
    wire = _oversized(9000)
    peer.send_raw(wire[:200])  # the body frame's head arrives without its end
    wait_readable(conn)
    with pytest.raises(FrameError) as info:
        conn.on_readable(time.monotonic())
    assert "8192" in str(info.value)


def test_frame_larger_than_frame_max_in_one_read_is_a_frame_error(peer):
    conn = open_connection(peer, frame_max=8192)
    open_channel(conn, peer)
    got = _collector(conn)
    peer.send_raw(_oversized(9000))
    try:
        pump(conn, until=lambda: bool(got), timeout=0.5)
    except FrameError:
        return
    raise AssertionError(f"a {len(got[0][3])}-byte body frame was accepted with frame_max 8192")


def test_huge_size_field_fails_at_once(peer):
    """A size field of 2 GB is refused from the frame head, not after buffering."""
    conn = open_connection(peer)
    peer.send_raw(bytes((3, 0, 1)) + (2**31).to_bytes(4, "big") + b"x" * 100)
    with pytest.raises(FrameError):
        pump(conn, timeout=1.0)


@pytest.mark.parametrize("garbage", [
    b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n",
    bytes((1, 0, 0, 0, 0, 0, 4, 1, 2, 3, 4, 0x00)),  # a method frame not ending in 0xCE
    bytes((9, 0, 0, 0, 0, 0, 0, 0xCE)),  # unknown frame type
    bytes((1, 0, 0, 0, 0, 0, 4, 0xFF, 0xFF, 0xFF, 0xFF, 0xCE)),  # unknown method
])
def test_garbage_is_a_frame_error(peer, garbage):
    conn, _ = connect(peer)
    converse(conn, peer, bytes)
    peer.send_raw(garbage)
    with pytest.raises(FrameError) as info:
        pump(conn, timeout=1.0)
    assert isinstance(info.value, ConnectionLost)


def test_garbage_after_open_is_a_frame_error(peer):
    conn = open_connection(peer)
    peer.send_raw(random.Random(1).randbytes(64) + b"\xce" * 8)
    with pytest.raises(ConnectionLost):
        pump(conn, timeout=1.0)


def _collector(conn: Connection) -> list[tuple]:
    got: list[tuple] = []
    conn.on_content = lambda ch, method, header, body: got.append((ch, method, header, body))
    return got


def test_deliveries_cut_at_every_byte_boundary(peer):
    conn = open_connection(peer)
    open_channel(conn, peer)
    got = _collector(conn)
    body = bytes(range(60)) * 2
    template = deliver_wire(1, body, body_frames=2)
    for cut in range(1, len(template)):
        wire = deliver_wire(cut, body, body_frames=2)
        peer.send_raw(wire[:cut])
        wait_readable(conn)
        conn.on_readable(time.monotonic())
        assert len(got) == cut - 1, f"a message completed from a cut at {cut}"
        peer.send_raw(wire[cut:])
        wait_readable(conn)
        conn.on_readable(time.monotonic())
        assert len(got) == cut, f"cut at {cut}"
        ch, method, header, got_body = got[-1]
        assert ch == 1 and got_body == body
        assert method == (b"ctag", cut, False, b"ex", b"rk")
        assert codec.decode_properties(header).message_id == "m-1"


def test_delivery_fed_byte_by_byte_and_in_random_pieces(peer):
    conn = open_connection(peer)
    open_channel(conn, peer)
    got = _collector(conn)
    body = b"0123456789" * 30
    wire = deliver_wire(1, body, body_frames=3)
    for i in range(len(wire)):
        peer.send_raw(wire[i : i + 1])
        wait_readable(conn)
        conn.on_readable(time.monotonic())
    assert [(g[1][1], g[3]) for g in got] == [(1, body)]
    rnd = random.Random(7)
    for tag in range(2, 60):
        b = rnd.randbytes(rnd.randrange(0, 400))
        wire = deliver_wire(tag, b, body_frames=rnd.randrange(1, 4)) + codec.HEARTBEAT
        cuts = sorted(rnd.sample(range(1, len(wire)), k=min(4, len(wire) - 1)))
        for a, z in zip([0, *cuts], [*cuts, len(wire)], strict=True):
            peer.send_raw(wire[a:z])
            wait_readable(conn)
            conn.on_readable(time.monotonic())
        assert len(got) == tag and got[-1][1][1] == tag and got[-1][3] == b
