"""One AMQP 0-9-1 connection's protocol, without a socket: bytes in, events out; commands in, bytes out.

Modelled on h11's split (a protocol object that owns no socket and no thread, driven by
whoever owns the bytes): `receive(data, now)` takes what the socket read and turns it into
calls on the owner's handlers; commands (`call`, `send`, `close`) append frames to
`outbox`, which the owner writes out; `tick(now)` runs the timers (handshake and close
deadlines, heartbeats) and says when it next needs to run. magne/engine/connection.py puts
a socket under it; the unit tests drive it with bytes alone (tests/unit/test_protocol.py,
including a property-based test feeding random, truncated and reordered frame streams).

Events go out as calls on handlers the owner sets, not as event objects returned from
`receive`: a delivery is the hot path (about 50,000 a second per process here), and an
object per event there is an allocation and a dispatch the worker does not need.

What may arrive when is one table per level (`_CONNECTION` for channel 0, `_channel_frame`
for the others): a frame the table does not allow in the current state is a
`ProtocolError`, and the connection cannot be trusted any more. A channel is OPENING from
our `channel.open` to its open-ok, OPEN, then CLOSING from our `channel.close` to its
close-ok (frames the broker sent before it saw our close are dropped then, as AMQP
says); a `channel.close` from the broker is answered with close-ok here and handed to
`on_channel_close` (one that crosses our own close is only answered: our close-ok follows
it). `call()` keeps a FIFO of expected replies per channel (AMQP answers a channel's
synchronous methods in order, so several can be pipelined).
"""

from __future__ import annotations

import enum
import os
import platform
from collections import deque
from collections.abc import Callable
from typing import Any

from pamqp import commands

from magne.amqp import codec
from magne.amqp.errors import AMQPError, BrokerTimeout, ChannelClosed, ConnectionClosed, ConnectionLost, FrameError
from magne.amqp.outbox import Outbox
from magne.amqp.url import Params
from magne.amqp.version import VERSION

PROTOCOL_HEADER = b"AMQP\x00\x00\x09\x01"
DEFAULT_FRAME_MAX = 131072
MIN_FRAME_MAX = 8192  # we never ask for less (RabbitMQ 4.x refuses smaller; 3.x allows 4096)
CLOSE_TIMEOUT = 5.0


class ProtocolError(FrameError):
    """A well-formed frame that the protocol does not allow here (a reply nobody asked for, a delivery on a
    channel that is not open, a handshake step out of order): the connection cannot go on."""


class Phase(enum.Enum):
    """The connection's protocol state (the socket's own states are the transport's)."""

    NEW = "new"
    AWAIT_START = "awaiting connection.start"
    AWAIT_TUNE = "awaiting connection.tune"
    AWAIT_OPEN_OK = "awaiting connection.open-ok"
    OPEN = "open"
    CLOSING = "closing"
    CLOSED = "closed"


_HANDSHAKE = (Phase.AWAIT_START, Phase.AWAIT_TUNE, Phase.AWAIT_OPEN_OK)


class ChannelPhase(enum.Enum):
    OPENING = "opening"
    OPEN = "open"
    CLOSING = "closing"


# Methods the broker may send on an open channel without being asked (the rest must answer a call()).
# Frames that may come without a call waiting for them at the head. Basic.CancelOk: RabbitMQ answers the
# basic.cancel of a STREAM consumer through its channel's mailbox, after replies to methods sent later (a passive
# declare right after it came first and was a ProtocolError that dropped the connection); magne.engine.session
# sends that cancel without waiting.
_UNASKED = (commands.Basic.Ack, commands.Basic.Nack, commands.Basic.Cancel, commands.Basic.CancelOk,
            commands.Channel.Flow)


def client_properties(name: str) -> dict[str, Any]:
    return {
        "product": "magne",
        "version": VERSION,
        "platform": f"Python {platform.python_version()}",
        "connection_name": name,
        "capabilities": {
            "authentication_failure_close": True,
            "basic.nack": True,
            "connection.blocked": True,
            "consumer_cancel_notify": True,
            "publisher_confirms": True,
            "per_consumer_qos": True,
        },
    }


def negotiate(ours: int, theirs: int, default: int) -> int:
    """AMQP tune: 0 means "no limit"; the smaller of two limits wins; both 0 takes `default`."""
    limits = [x for x in (ours, theirs) if x]
    return min(limits) if limits else default


def choose_mechanism(p: Params, offered: list[str]) -> str:
    """EXTERNAL (the client certificate is the login) when asked for, or when a certificate is given
    and the broker offers it; PLAIN otherwise."""
    wanted = p.auth_mechanism or ("EXTERNAL" if p.tls and p.certfile and "EXTERNAL" in offered else "PLAIN")
    if wanted not in offered:
        exc = ConnectionClosed(504, f"broker does not offer {wanted} authentication (it offers {' '.join(offered)})")
        exc.permanent = True
        raise exc
    return wanted


def _ignore(*_args: Any) -> None:
    pass


def _raise_channel_closed(_channel: int, exc: ChannelClosed) -> None:
    raise exc


Reply = tuple[tuple[type, ...], Callable[[Any], None]]


class Protocol:
    """Owned by one thread at a time (an engine loop's). Handlers are set by the owner before `start`."""

    def __init__(self, params: Params, name: str, heartbeat: int | None = None) -> None:
        self.params = params
        self.name = f"{name} pid={os.getpid()}"
        self.want_heartbeat = params.heartbeat if heartbeat is None else heartbeat
        self.phase = Phase.NEW
        self.outbox = Outbox()
        self.channels: dict[int, ChannelPhase] = {}
        self._open: set[int] = set()  # channels OPEN (shared with the decoder: its check on every delivery)
        self._closing: set[int] = set()  # channels CLOSING: content for them is dropped
        self.decoder = codec.Decoder(_ignore, self._dispatch_frame)
        self.decoder.channels_open, self.decoder.channels_closing = self._open, self._closing
        self.heartbeat = 0
        self.frame_max = DEFAULT_FRAME_MAX
        self.channel_max = params.channel_max
        self.server_properties: dict[str, Any] = {}
        self.blocked = False
        self.last_read = self.last_write = self.deadline = 0.0
        self.login_sent = False
        self.tuned = False  # the broker accepted the login (tune comes after it)
        self._calls: dict[int, deque[Reply]] = {}
        # Set by the owner:
        self.on_open: Callable[[], None] = _ignore
        self.on_frame: Callable[[int, Any], None] = _ignore
        self.on_channel_close: Callable[[int, ChannelClosed], None] = _raise_channel_closed
        self.on_blocked: Callable[[bool, str], None] = _ignore

    # -- starting --------------------------------------------------------------------------------
    def start(self, now: float, deadline: float | None = None) -> None:
        """The transport is connected: send the protocol header. The handshake must end by `deadline`."""
        self.phase = Phase.AWAIT_START
        self.deadline = deadline if deadline is not None else now + self.params.connect_timeout
        self.last_read = self.last_write = now
        self.outbox.write(PROTOCOL_HEADER)

    # -- bytes in ----------------------------------------------------------------------------------
    def receive(self, data: bytes, now: float) -> None:
        """What the socket read. Raises an AMQPError when the connection cannot go on."""
        self.last_read = now
        try:
            self.decoder.feed(data)
        except AMQPError:
            raise
        except Exception as exc:  # a handler choked on what a peer sent (or on its own bug): the connection cannot be trusted
            raise FrameError(f"handling a frame from the broker failed ({type(exc).__name__}: {str(exc)[:200]})") from None

    @property
    def on_content(self) -> Callable[[int, Any, bytes, bytes], None]:
        """Where complete messages go: set by the owner, handed straight to the decoder (hot path, no hop)."""
        return self.decoder.on_content

    @on_content.setter
    def on_content(self, handler: Callable[[int, Any, bytes, bytes], None]) -> None:
        self.decoder.on_content = handler

    def _dispatch_frame(self, channel: int, frame: Any) -> None:
        if channel == 0:
            handler = _CONNECTION.get((self.phase, type(frame)))
            if handler is None:
                if isinstance(frame, commands.Connection.Close) and self.phase is not Phase.CLOSED:
                    handler = Protocol._on_connection_close
                else:
                    raise ProtocolError(f"{frame.name} is not expected while the connection is {self.phase.value}")
            handler(self, frame)
            return
        if self.phase is not Phase.OPEN:
            if self.phase is Phase.CLOSING:
                return  # after our connection.close only close/close-ok count (AMQP 0-9-1, 2.2.4)
            raise ProtocolError(f"{frame.name} on channel {channel} before the connection is open")
        self._channel_frame(channel, frame)

    def _channel_frame(self, channel: int, frame: Any) -> None:
        state = self.channels.get(channel)
        if state is None:
            raise ProtocolError(f"{frame.name} on channel {channel}, which is not open")
        if isinstance(frame, commands.Channel.Close):
            self.send(channel, commands.Channel.CloseOk())
            if state is ChannelPhase.CLOSING:
                return  # both sides closed at once: the broker answers ours with close-ok next, which ends it
            self._forget(channel)
            self.on_channel_close(channel, ChannelClosed(channel, frame.reply_code, frame.reply_text))
            return
        if state is ChannelPhase.CLOSING:
            if isinstance(frame, commands.Channel.CloseOk):
                calls = self._calls.get(channel)
                self._forget(channel)
                if calls and commands.Channel.CloseOk in calls[-1][0]:
                    calls[-1][1](frame)
            return  # what the broker sent before it saw our close: dropped
        calls = self._calls.get(channel)
        if calls and isinstance(frame, calls[0][0]):
            if isinstance(frame, commands.Channel.OpenOk):
                self._set(channel, ChannelPhase.OPEN)
            calls.popleft()[1](frame)
            return
        if state is ChannelPhase.OPEN and isinstance(frame, _UNASKED):
            if isinstance(frame, commands.Channel.Flow):
                self.send(channel, commands.Channel.FlowOk(frame.active))
                return
            self.on_frame(channel, frame)
            return
        want = "/".join(r.__name__ for r in calls[0][0]) if calls else "nothing"
        raise ProtocolError(f"{frame.name} on channel {channel} ({state.value}) while waiting for {want}")

    def _set(self, channel: int, state: ChannelPhase) -> None:
        self.channels[channel] = state
        self._open.discard(channel)
        self._closing.discard(channel)
        if state is ChannelPhase.OPEN:
            self._open.add(channel)
        elif state is ChannelPhase.CLOSING:
            self._closing.add(channel)

    def _forget(self, channel: int) -> None:
        self.channels.pop(channel, None)
        self._open.discard(channel)
        self._closing.discard(channel)
        self._calls.pop(channel, None)

    # -- the connection's own frames (the table below) ---------------------------------------------------
    def _on_start(self, frame: commands.Connection.Start) -> None:
        p = self.params
        self.server_properties = dict(frame.server_properties or {})
        mechs = frame.mechanisms or ""
        if isinstance(mechs, bytes):  # pamqp hands a longstr that is not UTF-8 over as bytes
            mechs = mechs.decode("utf-8", "replace")
        mechanism = choose_mechanism(p, str(mechs).split())
        response = "" if mechanism == "EXTERNAL" else f"\0{p.username}\0{p.password}"
        self.send(0, commands.Connection.StartOk(client_properties(self.name), mechanism, response, "en_US"))
        self.login_sent = True
        self.phase = Phase.AWAIT_TUNE

    def _on_tune(self, frame: commands.Connection.Tune) -> None:
        p = self.params
        if frame.frame_max and frame.frame_max < 4096:  # AMQP 0-9-1's minimum: below it no content header fits
            raise ProtocolError(f"broker asked for frame_max {frame.frame_max}, below AMQP's minimum of 4096")
        self.channel_max = negotiate(p.channel_max, frame.channel_max, 65535)
        ours = max(MIN_FRAME_MAX, p.frame_max) if p.frame_max else 0  # 0: no limit of ours
        self.frame_max = negotiate(ours, frame.frame_max, DEFAULT_FRAME_MAX)
        self.tuned = True
        self.decoder.max_frame = self.frame_max
        # What the client says in tune-ok is what the broker uses; 0 means off.
        ours, theirs = self.want_heartbeat, frame.heartbeat
        self.heartbeat = 0 if ours == 0 else (min(theirs, ours) if theirs else ours)
        self.send(0, commands.Connection.TuneOk(self.channel_max, self.frame_max, self.heartbeat),
                  commands.Connection.Open(p.vhost))
        self.phase = Phase.AWAIT_OPEN_OK

    def _on_secure(self, _frame: Any) -> None:
        exc = ConnectionClosed(504, "broker sent connection.secure (a SASL challenge); magne logs in with PLAIN only")
        exc.permanent = True
        raise exc

    def _on_open_ok(self, _frame: Any) -> None:
        self.phase = Phase.OPEN
        self.on_open()

    def _on_connection_close(self, frame: commands.Connection.Close) -> None:
        self.send(0, commands.Connection.CloseOk())  # the owner writes what the socket takes, then drops it
        self.phase = Phase.CLOSED
        raise ConnectionClosed(frame.reply_code, frame.reply_text)

    def _on_close_ok(self, _frame: Any) -> None:
        self.phase = Phase.CLOSED

    def _on_blocked(self, frame: commands.Connection.Blocked) -> None:
        self.blocked = True
        self.on_blocked(True, frame.reason or "")

    def _on_unblocked(self, _frame: Any) -> None:
        self.blocked = False
        self.on_blocked(False, "")

    # -- timers ------------------------------------------------------------------------------------
    def tick(self, now: float) -> float | None:
        """Handshake and close deadlines, heartbeats. Returns when it next needs a call (None: no timer).
        Raises ConnectionLost (BrokerTimeout for a deadline) when the connection must be given up."""
        phase = self.phase
        if phase in _HANDSHAKE:
            if now >= self.deadline:
                raise BrokerTimeout(f"no answer from {self.params.host}:{self.params.port} within "
                                    f"{self.params.connect_timeout:g}s ({phase.value})")
            return self.deadline
        if phase is Phase.CLOSING:
            if now >= self.deadline:
                self.phase = Phase.CLOSED
                return None
            return self.deadline
        hb = self.heartbeat
        if phase is not Phase.OPEN or not hb:
            return None
        if now - self.last_read > 2 * hb:
            raise ConnectionLost(f"missed heartbeats: nothing from the broker for {now - self.last_read:.0f}s")
        if self.outbox:  # the socket is not taking bytes: a heartbeat would only queue behind them
            return self.last_read + 2 * hb
        if now - self.last_write >= hb / 2:
            self.outbox.write(codec.HEARTBEAT)
            return self.last_read + 2 * hb
        return min(self.last_write + hb / 2, self.last_read + 2 * hb)

    def wrote(self, now: float) -> None:
        """The owner's socket took bytes (the heartbeat clock)."""
        self.last_write = now

    # -- commands ------------------------------------------------------------------------------------
    def send(self, channel: int, *methods: Any) -> None:
        """Frames for methods that expect no reply (or whose reply the caller does not wait for)."""
        for m in methods:
            if isinstance(m, commands.Channel.Open):
                self._set(channel, ChannelPhase.OPENING)
            elif isinstance(m, commands.Channel.Close) and channel in self.channels:
                self._set(channel, ChannelPhase.CLOSING)
        self.outbox.write(codec.encode(channel, *methods))

    def call(self, channel: int, method: Any, replies: tuple[type, ...], on_reply: Callable[[Any], None] = _ignore) -> None:
        """Write a synchronous method; `on_reply` gets its reply. Pipelined: replies come in order per channel."""
        self.send(channel, method)
        self._calls.setdefault(channel, deque()).append((replies, on_reply))

    def answered(self, channel: int) -> None:
        """A pending call was answered by content (basic.get-ok arrives through on_content): take it off the FIFO."""
        calls = self._calls.get(channel)
        if calls:
            calls.popleft()

    def waiting(self, channel: int) -> int:
        """How many replies on `channel` have not arrived yet."""
        return len(self._calls.get(channel, ()))

    def is_open(self, channel: int) -> bool:
        return channel in self._open

    def close(self, now: float, text: str = "normal shutdown") -> bool:
        """Polite close: connection.close now; CLOSED at close-ok or CLOSE_TIMEOUT later. False if it was
        not open (nothing to say to the broker: the owner just drops the socket)."""
        if self.phase is Phase.OPEN:
            self.send(0, commands.Connection.Close(200, text, 0, 0))
            self.phase = Phase.CLOSING
            self.deadline = now + CLOSE_TIMEOUT
            return True
        return self.phase is Phase.CLOSING

    def reset(self) -> None:
        """The socket is gone: nothing more goes out, every channel is closed."""
        self.phase = Phase.CLOSED
        self.outbox.clear()
        self._calls.clear()
        self.channels.clear()
        self._open.clear()
        self._closing.clear()


_CONNECTION: dict[tuple[Phase, type], Callable[[Protocol, Any], None]] = {
    (Phase.AWAIT_START, commands.Connection.Start): Protocol._on_start,
    (Phase.AWAIT_TUNE, commands.Connection.Tune): Protocol._on_tune,
    (Phase.AWAIT_TUNE, commands.Connection.Secure): Protocol._on_secure,
    (Phase.AWAIT_OPEN_OK, commands.Connection.OpenOk): Protocol._on_open_ok,
    (Phase.OPEN, commands.Connection.Blocked): Protocol._on_blocked,
    (Phase.OPEN, commands.Connection.Unblocked): Protocol._on_unblocked,
    (Phase.CLOSING, commands.Connection.Blocked): Protocol._on_blocked,
    (Phase.CLOSING, commands.Connection.Unblocked): Protocol._on_unblocked,
    (Phase.CLOSING, commands.Connection.CloseOk): Protocol._on_close_ok,
}
