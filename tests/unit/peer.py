"""A scripted AMQP 0-9-1 peer for unit tests: no broker, byte-level control.

`Peer()` listens on 127.0.0.1 on a free port; `accept()` takes the one connection
magne makes (a non-blocking connect to loopback completes in the kernel's backlog,
so a test can start magne's Connection, then accept, on one thread). The peer sends
pamqp frames (`send`) or raw bytes (`send_raw`) and reads what magne wrote, decoded
by pamqp (`read_frame`, `expect`), each read bounded by a deadline.

`pump()` drives a magne Connection from the test thread the way the I/O thread
does: flush, tick, select on its socket, on_writable / on_readable.

When magne runs on its own thread (the I/O thread) and makes several connections
to the same address (the consuming connection, its reconnects, the publishing
link), `Peer(backlog=...)` keeps them queued and `accept_peer()` hands each one to
its own Peer (own socket and buffer, no listener), so one test can script them all.
"""

from __future__ import annotations

import select
import selectors
import socket
import struct
import time
from collections.abc import Callable
from typing import Any

from pamqp import commands
from pamqp import frame as pframe
from pamqp import heartbeat as pheartbeat

PROTOCOL_HEADER = b"AMQP\x00\x00\x09\x01"


class PeerTimeout(AssertionError):
    """The peer did not get what it waited for in time."""


class PeerClosed(AssertionError):
    """magne closed the socket while the peer waited for a frame."""


class Peer:
    def __init__(self, rcvbuf: int | None = None, backlog: int = 1) -> None:
        self.listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if rcvbuf is not None:  # inherited by the accepted socket: lets a test fill magne's path quickly
            self.listener.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(backlog)
        self.port: int = self.listener.getsockname()[1]
        self.sock: socket.socket | None = None
        self.buf = bytearray()
        self.eof = False

    # -- setup ------------------------------------------------------------------------------
    def url(self, user: str = "guest", password: str = "guest", vhost: str = "%2F", **query: Any) -> str:
        q = "&".join(f"{k}={v}" for k, v in query.items())
        return f"amqp://{user}:{password}@127.0.0.1:{self.port}/{vhost}" + (f"?{q}" if q else "")

    def accept(self, timeout: float = 2.0) -> None:
        r, _, _ = select.select([self.listener], [], [], timeout)
        if not r:
            raise PeerTimeout("magne did not connect")
        self.sock, _ = self.listener.accept()
        self.sock.setblocking(False)

    def accept_peer(self, timeout: float = 2.0) -> Peer:
        """Take the next connection as a Peer of its own (sharing nothing but the port); this Peer is unchanged."""
        r, _, _ = select.select([self.listener], [], [], timeout)
        if not r:
            raise PeerTimeout("magne did not connect")
        sock, _ = self.listener.accept()
        sock.setblocking(False)
        other = Peer.__new__(Peer)
        other.listener = None  # type: ignore[assignment]
        other.port = self.port
        other.sock = sock
        other.buf = bytearray()
        other.eof = False
        return other

    def pending(self, timeout: float = 0.0) -> bool:
        """Whether a connection waits to be accepted (within `timeout`)."""
        r, _, _ = select.select([self.listener], [], [], timeout)
        return bool(r)

    def close(self) -> None:
        for s in (self.sock, self.listener):
            if s is not None:
                try:
                    s.close()
                except OSError:
                    pass
        self.sock = None

    def __enter__(self) -> Peer:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()

    # -- writing ------------------------------------------------------------------------------
    def send(self, *methods: Any, channel: int = 0) -> None:
        self.send_raw(b"".join(pframe.marshal(m, channel) for m in methods))

    def send_raw(self, data: bytes) -> None:
        """Blocking (bounded) send of all of `data`."""
        assert self.sock is not None
        view = memoryview(data)
        deadline = time.monotonic() + 5.0
        while view:
            _, w, _ = select.select([], [self.sock], [], max(0.0, deadline - time.monotonic()))
            if not w:
                raise PeerTimeout("magne is not reading what the peer sends")
            n = self.sock.send(view)
            view = view[n:]

    def heartbeat(self) -> None:
        self.send_raw(pframe.marshal(pheartbeat.Heartbeat(), 0))

    # -- reading -----------------------------------------------------------------------------
    def poll(self) -> int:
        """Take what magne wrote so far, without waiting; returns how many bytes arrived."""
        assert self.sock is not None
        got = 0
        while True:
            try:
                data = self.sock.recv(1 << 20)
            except (BlockingIOError, InterruptedError):
                return got
            except ConnectionResetError:
                self.eof = True
                return got
            if not data:
                self.eof = True
                return got
            self.buf += data
            got += len(data)

    def _take_frame(self) -> tuple[int, Any] | None:
        if len(self.buf) >= 8 and bytes(self.buf[:8]) == PROTOCOL_HEADER:
            del self.buf[:8]
            return 0, PROTOCOL_HEADER
        if len(self.buf) < 7:
            return None
        _t, _ch, size = struct.unpack_from(">BHI", self.buf, 0)
        if len(self.buf) < 8 + size:
            return None
        raw = bytes(self.buf[: 8 + size])
        del self.buf[: 8 + size]
        _n, channel, frame = pframe.unmarshal(raw)
        return channel, frame

    def read_frame(self, timeout: float = 2.0) -> tuple[int, Any]:
        """The next frame magne wrote: (channel, pamqp frame), or (0, PROTOCOL_HEADER)."""
        assert self.sock is not None
        deadline = time.monotonic() + timeout
        while True:
            got = self._take_frame()
            if got is not None:
                return got
            if self.eof:
                raise PeerClosed(f"magne closed the socket ({len(self.buf)} bytes of a frame pending)")
            left = deadline - time.monotonic()
            if left <= 0:
                raise PeerTimeout(f"no frame from magne within {timeout}s")
            r, _, _ = select.select([self.sock], [], [], left)
            if r:
                self.poll()

    def frames(self) -> list[tuple[int, Any]]:
        """Every whole frame that arrived so far (non-blocking)."""
        self.poll()
        out = []
        while (got := self._take_frame()) is not None:
            out.append(got)
        return out

    def expect(self, kind: type, channel: int | None = None, timeout: float = 2.0, skip_heartbeats: bool = True) -> Any:
        """The next frame, which must be a `kind` (heartbeats skipped)."""
        while True:
            ch, f = self.read_frame(timeout)
            if skip_heartbeats and isinstance(f, pheartbeat.Heartbeat):
                continue
            if not isinstance(f, kind):
                raise AssertionError(f"expected {kind.__name__}, got {f!r} on channel {ch}")
            if channel is not None and ch != channel:
                raise AssertionError(f"expected {kind.__name__} on channel {channel}, got channel {ch}")
            return f

    def read_header(self, timeout: float = 2.0) -> None:
        ch, f = self.read_frame(timeout)
        if f != PROTOCOL_HEADER:
            raise AssertionError(f"expected the protocol header, got {f!r}")

    def wait_eof(self, timeout: float = 2.0) -> bool:
        """True if magne closed its end within `timeout` (what it wrote before stays in `buf`)."""
        assert self.sock is not None
        deadline = time.monotonic() + timeout
        while not self.eof and time.monotonic() < deadline:
            r, _, _ = select.select([self.sock], [], [], max(0.0, deadline - time.monotonic()))
            if r:
                self.poll()
        return self.eof

    # -- a scripted handshake -----------------------------------------------------------------
    def start(self, mechanisms: str = "PLAIN AMQPLAIN") -> commands.Connection.StartOk:
        """Read the protocol header, send connection.start, return magne's start-ok."""
        self.read_header()
        self.send(commands.Connection.Start(server_properties={"product": "peer"}, mechanisms=mechanisms))
        return self.expect(commands.Connection.StartOk)

    def tune(self, channel_max: int = 2047, frame_max: int = 131072, heartbeat: int = 60,
             ) -> tuple[commands.Connection.TuneOk, commands.Connection.Open]:
        self.send(commands.Connection.Tune(channel_max=channel_max, frame_max=frame_max, heartbeat=heartbeat))
        return self.expect(commands.Connection.TuneOk), self.expect(commands.Connection.Open)


def pump(conn: Any, until: Callable[[], bool] = lambda: False, timeout: float = 2.0,
         each: Callable[[], None] | None = None, raise_on_timeout: bool = True) -> None:
    """Drive a magne Connection like its owning loop does, until `until()` or `timeout`.

    Exceptions raised by the connection (ConnectionLost, FrameError, ...) propagate.
    `each` runs once per turn (for the peer to act while magne runs).
    """
    deadline = time.monotonic() + timeout
    while not until():
        now = time.monotonic()
        if now >= deadline:
            if raise_on_timeout:
                raise PeerTimeout(f"condition not reached within {timeout}s")
            return
        conn.flush(now)
        wake = conn.tick(now)
        if each is not None:
            each()
        if until():
            return
        wait = min(0.01, max(0.0, deadline - now))
        if wake is not None:
            wait = min(wait, max(0.0, wake - now))
        ev = conn.events()
        fd = conn.fileno()
        if fd < 0 or not ev:
            time.sleep(wait)
            continue
        r, w, _ = select.select([fd] if ev & selectors.EVENT_READ else [], [fd] if ev & selectors.EVENT_WRITE else [], [], wait)
        now = time.monotonic()
        if w:
            conn.on_writable(now)
        if r:
            conn.on_readable(now)


def converse(conn: Any, peer: Peer, kind: type | None = None, channel: int | None = None, timeout: float = 2.0) -> Any:
    """Drive `conn` until magne has written a whole frame (heartbeats skipped); check and return it.

    `kind=bytes` waits for the protocol header.
    """
    box: list[tuple[int, Any]] = []

    def arrived() -> bool:
        if box:
            return True
        peer.poll()
        while (got := peer._take_frame()) is not None:
            if isinstance(got[1], pheartbeat.Heartbeat):
                continue
            box.append(got)
            return True
        return False

    pump(conn, until=arrived, timeout=timeout)
    ch, f = box[0]
    if kind is not None and not isinstance(f, kind):
        raise AssertionError(f"expected {kind.__name__}, got {f!r} on channel {ch}")
    if channel is not None and ch != channel:
        raise AssertionError(f"expected a frame on channel {channel}, got channel {ch}")
    return f
