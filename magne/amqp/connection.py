"""One AMQP connection, driven without ever blocking.

The same object serves the I/O thread (whose selector calls `on_readable`,
`on_writable` and `tick`) and the blocking client (client.py, which calls them from
its own select loop), so the handshake, heartbeats, the close handshake and the
frame dispatch exist once. Nothing here waits: name resolution runs in a helper
thread when the host is not an IP literal, the TCP connect and the TLS handshake
are non-blocking, and every step of the AMQP handshake is a frame handler. A
connection that does not open within `connect_timeout` fails in `tick`.

Frame dispatch: connection-level frames (start, tune, open-ok, close, close-ok,
blocked) are handled here; `call()` keeps a FIFO of expected replies per channel
(AMQP answers synchronous methods in order, so several can be pipelined); a
`channel.close` from the broker is answered with close-ok here and handed to
`on_channel_close` (which raises by default); everything else goes to `on_frame`
and `on_content`.
"""

from __future__ import annotations

import enum
import ipaddress
import os
import platform
import selectors
import socket
import ssl
import threading
from collections import deque
from collections.abc import Callable
from importlib import metadata
from typing import Any

from pamqp import commands

from magne.amqp import codec
from magne.amqp.errors import AMQPError, ChannelClosed, ConnectionClosed, ConnectionLost, FrameError, TLSError, URLError
from magne.amqp.outbox import Outbox
from magne.amqp.url import Params, tls_context

PROTOCOL_HEADER = b"AMQP\x00\x00\x09\x01"
READ, WRITE = selectors.EVENT_READ, selectors.EVENT_WRITE
DEFAULT_FRAME_MAX = 131072
MIN_FRAME_MAX = 8192  # we never ask for less (RabbitMQ 4.x refuses smaller; 3.x allows 4096)
CLOSE_TIMEOUT = 5.0
_WOULD_BLOCK = (BlockingIOError, InterruptedError, ssl.SSLWantReadError, ssl.SSLWantWriteError)

try:
    _VERSION = metadata.version("magne")
except metadata.PackageNotFoundError:  # running from a source tree
    _VERSION = "unknown"


class State(enum.Enum):
    NEW = "new"
    RESOLVING = "resolving"
    CONNECTING = "connecting"
    TLS = "tls handshake"
    HANDSHAKE = "amqp handshake"
    OPEN = "open"
    CLOSING = "closing"
    CLOSED = "closed"


def client_properties(name: str) -> dict[str, Any]:
    return {
        "product": "magne",
        "version": _VERSION,
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


def tls_error(p: Params, exc: BaseException, early: bool = False) -> TLSError:
    """One clear line for a TLS failure, saying which setting to look at.

    `early`: the failure came right after the TLS handshake, before the broker said
    anything in AMQP; with TLS 1.3 that is how a broker refuses a client certificate.
    """
    where = f"TLS with {p.host}:{p.port}"
    if isinstance(exc, ssl.SSLCertVerificationError):
        code = exc.verify_code
        if code == 62:
            return TLSError(f"{where}: the broker's certificate does not match the host name {p.server_name!r} "
                            "(connect by the name in its certificate, or set server_name_indication=)")
        if code == 10:
            return TLSError(f"{where}: the broker's certificate has expired")
        if code in (18, 19, 20, 21, 2):
            return TLSError(f"{where}: the broker's certificate is not signed by a CA this client trusts "
                            "(set cacertfile= in the URL or MAGNE_TLS_CACERTFILE)")
        return TLSError(f"{where}: the broker's certificate was refused: {exc.verify_message}")
    reason = (getattr(exc, "reason", None) or str(exc)).upper()
    if "CERTIFICATE_REQUIRED" in reason or ("HANDSHAKE_FAILURE" in reason and not p.certfile):
        return TLSError(f"{where}: the broker requires a client certificate (set certfile= and keyfile=)")
    if "UNKNOWN_CA" in reason or "BAD_CERTIFICATE" in reason or "CERTIFICATE_UNKNOWN" in reason:
        return TLSError(f"{where}: the broker refused our client certificate ({reason.lower()})")
    if "CERTIFICATE_EXPIRED" in reason:
        return TLSError(f"{where}: the broker says our client certificate has expired")
    if "WRONG_VERSION_NUMBER" in reason:
        return TLSError(f"{where}: the port does not speak TLS (is it the plain AMQP port?)")
    if early and not p.certfile and ("EOF" in reason or isinstance(exc, ssl.SSLEOFError)):
        return TLSError(f"{where}: the broker closed the connection right after the TLS handshake: it most likely "
                        "requires a client certificate (set certfile= and keyfile=)")
    return TLSError(f"{where} failed: {exc}", permanent=False)


def _ignore(*_args: Any) -> None:
    pass


def _raise_channel_closed(_channel: int, exc: ChannelClosed) -> None:
    raise exc


class Connection:
    """Owned by one thread at a time (the I/O thread, or the thread using a Client)."""

    def __init__(self, params: Params, name: str, heartbeat: int | None = None) -> None:
        self.params = params
        self.name = f"{name} pid={os.getpid()}"
        self.want_heartbeat = params.heartbeat if heartbeat is None else heartbeat
        self.state = State.NEW
        self.sock: socket.socket | ssl.SSLSocket | None = None
        self.outbox = Outbox()
        self.decoder = codec.Decoder(_ignore, self._dispatch_frame)
        self.heartbeat = 0
        self.frame_max = DEFAULT_FRAME_MAX
        self.channel_max = params.channel_max
        self.server_properties: dict[str, Any] = {}
        self.blocked = False
        self.last_read = self.last_write = self.deadline = 0.0
        self._calls: dict[int, deque[tuple[tuple[type, ...], Callable[[Any], None]]]] = {}
        self._addrs: list[tuple[Any, ...]] = []
        self._resolved: list[tuple[Any, ...]] | BaseException | None = None
        self._tls_wants = WRITE
        self._login_sent = False
        self._tuned = False  # the broker accepted the login (tune comes after it)
        # Set by the owner:
        self.on_open: Callable[[], None] = _ignore
        self.on_frame: Callable[[int, Any], None] = _ignore
        self.on_channel_close: Callable[[int, ChannelClosed], None] = _raise_channel_closed
        self.on_blocked: Callable[[bool, str], None] = _ignore

    # -- starting ------------------------------------------------------------
    def start(self, now: float) -> None:
        """Begin connecting; returns at once. Progress comes from on_readable/on_writable/tick."""
        p = self.params
        self.deadline = now + p.connect_timeout
        try:
            ipaddress.ip_address(p.host)
        except ValueError:
            self.state = State.RESOLVING
            threading.Thread(target=self._resolve, name="magne-resolve", daemon=True).start()
            return
        family = socket.AF_INET6 if ":" in p.host else socket.AF_INET
        self._addrs = [(family, (p.host, p.port))]
        self._connect_next()

    def _resolve(self) -> None:
        """Runs in a short-lived helper thread: getaddrinfo blocks and cannot be bounded."""
        try:
            infos = socket.getaddrinfo(self.params.host, self.params.port, type=socket.SOCK_STREAM)
            self._resolved = [(fam, addr) for fam, _t, _p, _c, addr in infos]
        except OSError as exc:
            self._resolved = exc

    def _connect_next(self, error: str = "") -> None:
        if not self._addrs:
            raise ConnectionLost(f"cannot reach the broker at {self.params.host}:{self.params.port}: {error or 'no address'}")
        family, addr = self._addrs.pop(0)
        self._close_socket()
        try:
            sock = socket.socket(family, socket.SOCK_STREAM)
        except OSError as exc:  # EMFILE, say: a failed attempt, not a crash
            raise ConnectionLost(f"cannot open a socket to {self.params.host}:{self.params.port}: {exc}") from None
        sock.setblocking(False)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.sock = sock
        try:
            err = sock.connect_ex(addr)
        except OSError as exc:
            err = exc.errno or 1
        if err not in (0, 115, 36, 10035):  # EINPROGRESS (Linux, macOS), WSAEWOULDBLOCK
            self._connect_next(os.strerror(err))
            return
        self.state = State.CONNECTING

    def _connected(self) -> None:
        assert self.sock is not None
        err = self.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        if err:
            self._connect_next(os.strerror(err))
            return
        if self.params.tls:
            try:
                ctx = tls_context(self.params)
            except URLError as exc:
                raise TLSError(str(exc)) from None
            self.sock = ctx.wrap_socket(self.sock, server_hostname=self.params.server_name, do_handshake_on_connect=False)
            self.state = State.TLS
            self._tls_step()
        else:
            self._begin_amqp()

    def _tls_step(self) -> None:
        assert isinstance(self.sock, ssl.SSLSocket)
        try:
            self.sock.do_handshake()
        except ssl.SSLWantReadError:
            self._tls_wants = READ
        except ssl.SSLWantWriteError:
            self._tls_wants = WRITE
        except (OSError, ssl.SSLError) as exc:
            raise tls_error(self.params, exc) from None
        else:
            self._begin_amqp()

    def _begin_amqp(self) -> None:
        self.state = State.HANDSHAKE
        self.outbox.write(PROTOCOL_HEADER)

    # -- driving (called by the owning thread's loop) --------------------------
    def fileno(self) -> int:
        return self.sock.fileno() if self.sock is not None else -1

    def events(self) -> int:
        """What to wait for on the socket now (0: nothing, e.g. while resolving)."""
        if self.sock is None or self.state in (State.RESOLVING, State.CLOSED):
            return 0
        if self.state is State.CONNECTING:
            return WRITE
        if self.state is State.TLS:
            return self._tls_wants
        return READ | WRITE if self.outbox else READ

    def on_writable(self, now: float) -> None:
        if self.state is State.CONNECTING:
            self._connected()
        elif self.state is State.TLS:
            self._tls_step()
        if self.state not in (State.CONNECTING, State.TLS):
            self.flush(now)

    def on_readable(self, now: float) -> bool:
        """Read and dispatch what arrived; False if nothing had (a spurious wake-up)."""
        if self.state is State.TLS:
            self._tls_step()
            return False
        sock = self.sock
        if sock is None or self.state is State.CONNECTING:
            return False
        try:
            data = sock.recv(262144)
            while isinstance(sock, ssl.SSLSocket) and sock.pending():  # decrypted bytes the selector cannot see
                data += sock.recv(262144)
        except _WOULD_BLOCK:
            return False
        except ssl.SSLError as exc:  # TLS 1.3: a refused client certificate shows on the first read
            raise tls_error(self.params, exc, early=self._early()) from None
        except OSError as exc:
            raise self._lost(f"receive failed: {exc}") from None
        if not data:
            raise self._lost("the broker closed the socket")
        self.last_read = now
        try:
            self.decoder.feed(data)
        except AMQPError:
            raise
        except Exception as exc:  # a handler choked on what a peer sent (or on its own bug): the connection cannot be trusted
            raise FrameError(f"handling a frame from the broker failed ({type(exc).__name__}: {str(exc)[:200]})") from None
        return True

    def _early(self) -> bool:
        """TLS is up but AMQP has not answered yet: where a broker drops a client it does not accept."""
        return self.state is State.HANDSHAKE and not self._login_sent

    def _lost(self, why: str) -> AMQPError:
        if self.state is State.HANDSHAKE and self._login_sent and not self._tuned:
            # Brokers without authentication_failure_close just drop the socket after a bad login.
            return ConnectionClosed(403, f"login refused for user {self.params.username!r}")
        if self.state is State.HANDSHAKE and not self._login_sent:
            p = self.params
            return ConnectionLost(f"{p.host}:{p.port} did not answer as an AMQP 0-9-1 broker ({why})")
        return ConnectionLost(why)

    def flush(self, now: float) -> None:
        if self.outbox and self.sock is not None:
            if self.outbox.flush(self._send_some):
                self.last_write = now

    def _send_some(self, data: memoryview) -> int:
        assert self.sock is not None
        try:
            return self.sock.send(data)
        except _WOULD_BLOCK:
            return 0
        except ssl.SSLError as exc:
            raise tls_error(self.params, exc, early=self._early()) from None
        except OSError as exc:
            raise self._lost(f"send failed: {exc}") from None

    def tick(self, now: float) -> float | None:
        """Timers: handshake and close deadlines, heartbeats. Returns when it next needs a call (None: no timer)."""
        st = self.state
        if st is State.RESOLVING:
            got = self._resolved
            if isinstance(got, BaseException):
                raise ConnectionLost(f"cannot resolve broker host {self.params.host!r}: {got}")
            if got is not None:
                self._addrs = list(got)
                self._connect_next()
            elif now >= self.deadline:
                raise ConnectionLost(f"resolving broker host {self.params.host!r} took over {self.params.connect_timeout:g}s")
            return now + 0.02
        if st in (State.CONNECTING, State.TLS, State.HANDSHAKE, State.CLOSING):
            if now >= self.deadline:
                if st is State.CLOSING:
                    self.abort()
                    return None
                raise ConnectionLost(f"no answer from {self.params.host}:{self.params.port} within "
                                     f"{self.params.connect_timeout:g}s ({st.value})")
            return self.deadline
        hb = self.heartbeat
        if st is not State.OPEN or not hb:
            return None
        if now - self.last_read > 2 * hb:
            raise ConnectionLost(f"missed heartbeats: nothing from the broker for {now - self.last_read:.0f}s")
        if self.outbox:  # the socket is not taking bytes: a heartbeat would only queue behind them
            return self.last_read + 2 * hb
        if now - self.last_write >= hb / 2:
            self.outbox.write(codec.HEARTBEAT)
            return self.last_read + 2 * hb
        return min(self.last_write + hb / 2, self.last_read + 2 * hb)

    # -- writing ------------------------------------------------------------------
    def send(self, channel: int, *methods: Any) -> None:
        self.outbox.write(codec.encode(channel, *methods))

    def call(self, channel: int, method: Any, replies: tuple[type, ...], on_reply: Callable[[Any], None] = _ignore) -> None:
        """Write a synchronous method; `on_reply` gets its reply. Pipelined: replies come in order per channel."""
        self.send(channel, method)
        self._calls.setdefault(channel, deque()).append((replies, on_reply))

    def waiting(self, channel: int) -> int:
        """How many replies on `channel` have not arrived yet."""
        return len(self._calls.get(channel, ()))

    def close(self, now: float, text: str = "normal shutdown") -> None:
        """Polite close: connection.close now, the socket goes at close-ok (or CLOSE_TIMEOUT later)."""
        if self.state is State.OPEN:
            self.send(0, commands.Connection.Close(200, text, 0, 0))
            self.state = State.CLOSING
            self.deadline = now + CLOSE_TIMEOUT
        elif self.state is not State.CLOSING:
            self.abort()

    def abort(self) -> None:
        """Drop the socket (the broker requeues what was unacked). Whatever the socket takes at once is
        written first, so an answer already queued (a close-ok) still goes out; nothing waits."""
        if self.sock is not None and self.outbox and self.state not in (State.CONNECTING, State.TLS, State.RESOLVING):
            try:
                self.outbox.flush(self._send_some)
            except AMQPError:
                pass
        self._close_socket()
        self.state = State.CLOSED
        self.outbox.clear()
        self._calls.clear()

    def _close_socket(self) -> None:
        if self.sock is not None:
            try:
                self.sock.close()
            except OSError:
                pass
            self.sock = None

    # -- frames from the broker -------------------------------------------------
    @property
    def on_content(self) -> Callable[[int, Any, bytes, bytes], None]:
        """Where complete messages go: set by the owner, handed straight to the decoder (hot path, no hop)."""
        return self.decoder.on_content

    @on_content.setter
    def on_content(self, handler: Callable[[int, Any, bytes, bytes], None]) -> None:
        self.decoder.on_content = handler

    def _dispatch_frame(self, channel: int, frame: Any) -> None:
        if channel == 0:
            self._on_connection_frame(frame)
            return
        if isinstance(frame, commands.Channel.Close):
            self.send(channel, commands.Channel.CloseOk())
            self._calls.pop(channel, None)
            self.on_channel_close(channel, ChannelClosed(channel, frame.reply_code, frame.reply_text))
            return
        calls = self._calls.get(channel)
        if calls and isinstance(frame, calls[0][0]):
            calls.popleft()[1](frame)
            return
        self.on_frame(channel, frame)

    def _on_connection_frame(self, frame: Any) -> None:
        p = self.params
        if isinstance(frame, commands.Connection.Start):
            self.server_properties = dict(frame.server_properties or {})
            mechs = frame.mechanisms or ""
            if isinstance(mechs, bytes):  # pamqp hands a longstr that is not UTF-8 over as bytes
                mechs = mechs.decode("utf-8", "replace")
            mechanism = choose_mechanism(p, str(mechs).split())
            response = "" if mechanism == "EXTERNAL" else f"\0{p.username}\0{p.password}"
            self.send(0, commands.Connection.StartOk(client_properties(self.name), mechanism, response, "en_US"))
            self._login_sent = True
        elif isinstance(frame, commands.Connection.Tune):
            self.channel_max = negotiate(p.channel_max, frame.channel_max, 65535)
            ours = max(MIN_FRAME_MAX, p.frame_max) if p.frame_max else 0  # 0: no limit of ours
            self.frame_max = negotiate(ours, frame.frame_max, DEFAULT_FRAME_MAX)
            self._tuned = True
            self.decoder.max_frame = self.frame_max
            # What the client says in tune-ok is what the broker uses; 0 means off.
            ours, theirs = self.want_heartbeat, frame.heartbeat
            self.heartbeat = 0 if ours == 0 else (min(theirs, ours) if theirs else ours)
            self.send(0, commands.Connection.TuneOk(self.channel_max, self.frame_max, self.heartbeat),
                      commands.Connection.Open(p.vhost))
        elif isinstance(frame, commands.Connection.Secure):
            exc = ConnectionClosed(504, "broker sent connection.secure (a SASL challenge); magne logs in with PLAIN only")
            exc.permanent = True
            raise exc
        elif isinstance(frame, commands.Connection.OpenOk):
            self.state = State.OPEN
            self.on_open()
        elif isinstance(frame, commands.Connection.Close):
            # Answer (abort writes what the socket takes), then give up the connection.
            self.send(0, commands.Connection.CloseOk())
            self.abort()
            raise ConnectionClosed(frame.reply_code, frame.reply_text)
        elif isinstance(frame, commands.Connection.CloseOk):
            self.abort()
        elif isinstance(frame, commands.Connection.Blocked):
            self.blocked = True
            self.on_blocked(True, frame.reason or "")
        elif isinstance(frame, commands.Connection.Unblocked):
            self.blocked = False
            self.on_blocked(False, "")
