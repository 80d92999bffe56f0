"""One AMQP connection: the socket-free protocol (magne.amqp.protocol) on a transport (socket, TLS, DNS).

The only glue between the two: bytes the socket read go into `Protocol.receive`, bytes the
protocol queued go out through `Transport.send`, and the states of both read as one
`State`. Driven by an engine loop's thread (magne/engine/loop.py), which calls
`on_readable`, `on_writable`, `flush` and `tick`; nothing here waits.
"""

from __future__ import annotations

import enum
import os
import weakref
from collections.abc import Callable
from typing import Any

from magne.amqp.errors import AMQPError, ChannelClosed, ConnectionClosed, ConnectionLost
from magne.amqp.outbox import Outbox
from magne.amqp.protocol import DEFAULT_FRAME_MAX, MIN_FRAME_MAX, Phase, Protocol, negotiate
from magne.amqp.url import Params
from magne.engine.transport import READ, WRITE, Stage, Transport

__all__ = ["DEFAULT_FRAME_MAX", "MIN_FRAME_MAX", "READ", "WRITE", "Connection", "State", "negotiate"]


class State(enum.Enum):
    NEW = "new"
    RESOLVING = "resolving"
    CONNECTING = "connecting"
    TLS = "tls handshake"
    HANDSHAKE = "amqp handshake"
    OPEN = "open"
    CLOSING = "closing"
    CLOSED = "closed"


_BY_STAGE = {Stage.NEW: State.NEW, Stage.RESOLVING: State.RESOLVING, Stage.CONNECTING: State.CONNECTING,
             Stage.TLS: State.TLS, Stage.CLOSED: State.CLOSED}
_BY_PHASE = {Phase.NEW: State.HANDSHAKE, Phase.AWAIT_START: State.HANDSHAKE, Phase.AWAIT_TUNE: State.HANDSHAKE,
             Phase.AWAIT_OPEN_OK: State.HANDSHAKE, Phase.OPEN: State.OPEN, Phase.CLOSING: State.CLOSING,
             Phase.CLOSED: State.CLOSED}

# Every connection of this process, for the at-fork hook: a child forked by a task (or by an application)
# must not keep the worker's sockets open (the broker would not see the worker die until the child exits).
_LIVE: weakref.WeakSet[Connection] = weakref.WeakSet()


class Connection:
    """Owned by one engine loop's thread. Handlers (`on_open`, `on_frame`, `on_content`, `on_channel_close`,
    `on_blocked`) are the protocol's, set by the owner."""

    def __init__(self, params: Params, name: str, heartbeat: int | None = None) -> None:
        self.params = params
        self.protocol = Protocol(params, name, heartbeat)
        self.transport = Transport(params)
        self.transport.early = self._early
        _LIVE.add(self)

    # -- the protocol's face, for the owner ----------------------------------------------------
    @property
    def name(self) -> str:
        return self.protocol.name

    @property
    def outbox(self) -> Outbox:
        return self.protocol.outbox

    @property
    def sock(self) -> Any:
        return self.transport.sock

    @property
    def frame_max(self) -> int:
        return self.protocol.frame_max

    @property
    def heartbeat(self) -> int:
        return self.protocol.heartbeat

    @property
    def deadline(self) -> float:
        """When the connect, the handshake or the close must be done (the layer at work now)."""
        return self.protocol.deadline if self.transport.stage is Stage.UP else self.transport.deadline

    @property
    def decoder(self) -> Any:
        return self.protocol.decoder

    @property
    def channel_max(self) -> int:
        return self.protocol.channel_max

    @property
    def blocked(self) -> bool:
        return self.protocol.blocked

    @property
    def server_properties(self) -> dict[str, Any]:
        return self.protocol.server_properties

    @property
    def state(self) -> State:
        stage = self.transport.stage
        if stage is Stage.UP:
            return _BY_PHASE[self.protocol.phase]
        return _BY_STAGE[stage]

    def call(self, channel: int, method: Any, replies: tuple[type, ...], on_reply: Callable[[Any], None] | None = None) -> None:
        if on_reply is None:
            self.protocol.call(channel, method, replies)
        else:
            self.protocol.call(channel, method, replies, on_reply)

    def send(self, channel: int, *methods: Any) -> None:
        self.protocol.send(channel, *methods)

    def waiting(self, channel: int) -> int:
        return self.protocol.waiting(channel)

    def answered(self, channel: int) -> None:
        self.protocol.answered(channel)

    def is_open(self, channel: int) -> bool:
        return self.protocol.is_open(channel)

    # The protocol's handlers, set by the owner.
    on_open = property(lambda self: self.protocol.on_open, lambda self, f: setattr(self.protocol, "on_open", f))
    on_frame = property(lambda self: self.protocol.on_frame, lambda self, f: setattr(self.protocol, "on_frame", f))
    on_content = property(lambda self: self.protocol.on_content,
                          lambda self, f: setattr(self.protocol, "on_content", f))
    on_channel_close = property(lambda self: self.protocol.on_channel_close,
                                lambda self, f: setattr(self.protocol, "on_channel_close", f))
    on_blocked = property(lambda self: self.protocol.on_blocked,
                          lambda self, f: setattr(self.protocol, "on_blocked", f))

    # -- starting and driving (the owning loop's thread) ------------------------------------------------
    def start(self, now: float) -> None:
        """Begin connecting; returns at once. Progress comes from on_readable/on_writable/tick."""
        self.transport.start(now)
        self._maybe_up(now)

    def _maybe_up(self, now: float) -> None:
        if self.transport.stage is Stage.UP and self.protocol.phase is Phase.NEW:
            self.protocol.start(now, self.transport.deadline)

    def fileno(self) -> int:
        return self.transport.fileno()

    def events(self) -> int:
        """What to wait for on the socket now (0: nothing, e.g. while resolving)."""
        if self.protocol.phase is Phase.CLOSED:
            return 0
        return self.transport.events(bool(self.protocol.outbox))

    def on_writable(self, now: float) -> None:
        if self.transport.stage is not Stage.UP:
            if not self.transport.writable():
                return
            self._maybe_up(now)
        self.flush(now)

    def on_readable(self, now: float) -> bool:
        """Read and dispatch what arrived; False if nothing had (a spurious wake-up)."""
        try:
            data = self.transport.recv()
        except ConnectionLost as exc:
            raise self._lost(exc) from None
        if data is None:
            self._maybe_up(now)
            return False
        try:
            self.protocol.receive(data, now)
        except AMQPError:
            if self.protocol.phase is Phase.CLOSED:
                self.abort()  # the broker closed the connection: our close-ok goes out with what the socket takes
            raise
        if self.protocol.phase is Phase.CLOSED:
            self.abort()  # close-ok arrived (or the broker closed and we answered)
        return True

    def flush(self, now: float) -> None:
        out = self.protocol.outbox
        if out and self.transport.stage is Stage.UP:
            try:
                if out.flush(self.transport.send):
                    self.protocol.wrote(now)
            except ConnectionLost as exc:
                raise self._lost(exc) from None

    def tick(self, now: float) -> float | None:
        """Timers of both layers. Returns when it next needs a call (None: no timer)."""
        if self.transport.stage is not Stage.UP:
            wake = self.transport.tick(now)
            self._maybe_up(now)
            if self.transport.stage is not Stage.UP:
                return wake
        try:
            wake = self.protocol.tick(now)
        except ConnectionLost as exc:
            raise self._lost(exc) from None
        if self.protocol.phase is Phase.CLOSED:
            self.abort()  # the close deadline passed
        return wake

    def _early(self) -> bool:
        """TLS is up but AMQP has not answered yet: where a broker drops a client it does not accept."""
        return self.protocol.phase is Phase.AWAIT_START and not self.protocol.login_sent

    def _lost(self, exc: ConnectionLost) -> AMQPError:
        """What a lost socket means at this point of the handshake."""
        p = self.protocol
        if p.phase is Phase.AWAIT_TUNE and p.login_sent and not p.tuned:
            # Brokers without authentication_failure_close just drop the socket after a bad login.
            return ConnectionClosed(403, f"login refused for user {self.params.username!r}")
        if p.phase is Phase.AWAIT_START and type(exc) is ConnectionLost:
            return ConnectionLost(f"{self.params.host}:{self.params.port} did not answer as an AMQP 0-9-1 broker ({exc})")
        return exc

    # -- ending -------------------------------------------------------------------------------------
    def close(self, now: float, text: str = "normal shutdown") -> None:
        """Polite close: connection.close now, the socket goes at close-ok (or CLOSE_TIMEOUT later)."""
        if not self.protocol.close(now, text):
            self.abort()

    def abort(self) -> None:
        """Drop the socket (the broker requeues what was unacked). Whatever the socket takes at once is
        written first, so an answer already queued (a close-ok) still goes out; nothing waits. The socket is
        shut down, not only closed, so a process that inherited its fd cannot keep the connection up."""
        out = self.protocol.outbox
        if out and self.transport.stage is Stage.UP:
            try:
                out.flush(self.transport.send)
            except AMQPError:
                pass
        self.transport.shutdown()
        self.protocol.reset()

    def forget_in_child(self) -> None:
        """In a forked child: close this process's copy of the fd without touching the parent's connection."""
        self.transport.close()
        self.transport.stage = Stage.CLOSED
        self.protocol.reset()


def close_inherited() -> None:
    """os.register_at_fork hook, in the child: drop the parent's sockets (close only; shutdown would cut the
    parent's connection). A process forked by a task (or by an application) then holds none of them, so the
    broker sees the worker go the moment it dies."""
    for conn in list(_LIVE):
        conn.forget_in_child()


os.register_at_fork(after_in_child=close_inherited)


__all__ += ["ChannelClosed", "close_inherited"]
