"""One AMQP connection: socket, handshake and blocking RPCs.

The handshake and the rare setup calls (declare, qos, consume, confirm.select) are
done in blocking mode; the I/O thread then switches the socket to non-blocking and
drives it from its selector, reusing the same decoder. The publisher and the
`magne dead` commands use this class in blocking mode only.
"""

from __future__ import annotations

import os
import platform
import socket
import ssl
import time
from collections import deque
from typing import Any

from pamqp import commands

from magne import __version__
from magne.amqp import frames
from magne.amqp.url import Params

PROTOCOL_HEADER = b"AMQP\x00\x00\x09\x01"
_WOULD_BLOCK = (BlockingIOError, ssl.SSLWantReadError, ssl.SSLWantWriteError)


class AMQPError(Exception):
    """Base of every broker-side failure."""


class ConnectionLost(AMQPError):
    """The socket is gone (reset, EOF, missed heartbeats, unreachable broker)."""


class ConnectionClosed(AMQPError):
    """The broker closed the connection with connection.close."""

    def __init__(self, code: int, text: str) -> None:
        super().__init__(f"broker closed the connection: {code} {text}")
        self.code = code
        self.text = text


class ChannelClosed(AMQPError):
    """The broker closed a channel with channel.close (e.g. 406, 404)."""

    def __init__(self, channel: int, code: int, text: str) -> None:
        super().__init__(f"broker closed channel {channel}: {code} {text}")
        self.channel = channel
        self.code = code
        self.text = text


def client_properties(name: str) -> dict[str, Any]:
    return {
        "product": "magne",
        "version": __version__,
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


class Connection:
    def __init__(self, params: Params, name: str, heartbeat: int | None = None, rpc_timeout: float = 30.0) -> None:
        self.params = params
        self.rpc_timeout = rpc_timeout  # how long a blocking call waits for the broker's answer
        self.name = f"{name} pid={os.getpid()}"
        self.want_heartbeat = params.heartbeat if heartbeat is None else heartbeat
        self.sock: socket.socket | ssl.SSLSocket | None = None
        self.heartbeat = 0
        self.frame_max = params.frame_max
        self.channel_max = params.channel_max
        self.server_properties: dict[str, Any] = {}
        self.inbox: deque[tuple[int, Any]] = deque()
        self.contents: deque[tuple[int, Any, bytes, bytes]] = deque()
        self.decoder = frames.Decoder(self._keep_content, self._keep_frame)

    # -- the blocking side -------------------------------------------------
    def connect(self) -> None:
        p = self.params
        try:
            raw = socket.create_connection((p.host, p.port), timeout=p.connect_timeout)
        except OSError as exc:
            raise ConnectionLost(f"cannot reach the broker at {p.host}:{p.port}: {exc}") from None
        raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if p.tls:
            ctx = ssl.create_default_context()
            try:
                raw = ctx.wrap_socket(raw, server_hostname=p.host)
            except (OSError, ssl.SSLError) as exc:
                raw.close()
                raise ConnectionLost(f"TLS handshake with {p.host}:{p.port} failed: {exc}") from None
        self.sock = raw
        try:
            self._handshake()
        except BaseException:
            self.close_socket()
            raise

    def _handshake(self) -> None:
        p = self.params
        self.sendall(PROTOCOL_HEADER)
        try:
            start = self.wait(0, commands.Connection.Start)
        except ConnectionLost as exc:
            raise ConnectionLost(f"{p.host}:{p.port} did not answer as an AMQP 0-9-1 broker ({exc})") from None
        self.server_properties = dict(start.server_properties or {})
        if b"PLAIN" not in (start.mechanisms or "").encode().split():
            raise ConnectionClosed(504, f"broker does not offer PLAIN auth (offers {start.mechanisms})")
        response = f"\0{p.username}\0{p.password}"
        self.send(0, commands.Connection.StartOk(client_properties(self.name), "PLAIN", response, "en_US"))
        try:
            tune = self.wait(0, commands.Connection.Tune)
        except ConnectionLost:
            # Brokers without authentication_failure_close just drop the socket.
            raise ConnectionClosed(403, f"login refused for user {p.username!r}") from None
        self.channel_max = min(x for x in (tune.channel_max, p.channel_max, 65535) if x)
        self.frame_max = min(x for x in (tune.frame_max, p.frame_max) if x)
        server_hb, ours = tune.heartbeat, self.want_heartbeat
        # What the client says in tune-ok is what the broker uses; 0 means off.
        self.heartbeat = 0 if ours == 0 else (min(server_hb, ours) if server_hb else ours)
        self.send(0, commands.Connection.TuneOk(self.channel_max, self.frame_max, self.heartbeat))
        self.send(0, commands.Connection.Open(p.vhost))
        self.wait(0, commands.Connection.OpenOk)

    def sendall(self, data: bytes) -> None:
        assert self.sock is not None
        try:
            self.sock.sendall(data)
        except OSError as exc:
            raise ConnectionLost(f"send failed: {exc}") from None

    def send(self, channel: int, *methods: Any) -> None:
        self.sendall(frames.encode(channel, *methods))

    def rpc(self, channel: int, method: Any, *reply: type, timeout: float | None = None) -> Any:
        self.send(channel, method)
        return self.wait(channel, *reply, timeout=timeout)

    def wait(self, channel: int, *types: type, timeout: float | None = None) -> Any:
        """Read until a frame of one of `types` arrives on `channel`."""
        timeout = self.rpc_timeout if timeout is None else timeout
        deadline = time.monotonic() + timeout
        while True:
            for i, (ch, frame) in enumerate(self.inbox):
                if ch == channel and isinstance(frame, types):
                    del self.inbox[i]
                    return frame
            left = deadline - time.monotonic()
            if left <= 0:
                raise ConnectionLost(f"no {'/'.join(t.__name__ for t in types)} from the broker within {timeout:.0f}s")
            self.pump(left)

    def pump(self, timeout: float) -> None:
        """One blocking read (at most `timeout` seconds), decoded into inbox/contents."""
        assert self.sock is not None
        self.sock.settimeout(timeout)
        try:
            data = self.sock.recv(262144)
        except TimeoutError:
            return
        except OSError as exc:
            raise ConnectionLost(f"receive failed: {exc}") from None
        if not data:
            raise ConnectionLost("the broker closed the socket")
        self.feed(data)

    # -- the non-blocking side (the I/O thread's selector loop) ------------------
    def send_some(self, data: bytes) -> int:
        """Write what the socket takes now; returns the bytes sent (0 when it is full)."""
        assert self.sock is not None
        try:
            return self.sock.send(data)
        except _WOULD_BLOCK:
            return 0
        except OSError as exc:
            raise ConnectionLost(f"send failed: {exc}") from None

    def recv_some(self) -> bool:
        """Read and decode what has arrived; False when nothing had (a spurious wake-up)."""
        assert self.sock is not None
        try:
            data = self.sock.recv(262144)
            # TLS may hold decrypted bytes the selector cannot see.
            while isinstance(self.sock, ssl.SSLSocket) and self.sock.pending():
                data += self.sock.recv(262144)
        except _WOULD_BLOCK:
            return False
        except OSError as exc:
            raise ConnectionLost(f"receive failed: {exc}") from None
        if not data:
            raise ConnectionLost("the broker closed the socket")
        self.feed(data)
        return True

    def feed(self, data: bytes) -> None:
        try:
            self.decoder.feed(data)
        except frames.FrameError as exc:
            raise ConnectionLost(f"bad frame from the broker: {exc}") from None

    def _keep_content(self, channel: int, method: Any, header: bytes, body: bytes) -> None:
        self.contents.append((channel, method, header, body))

    def _keep_frame(self, channel: int, frame: Any) -> None:
        """Blocking-mode frame handler: closes become exceptions, the rest waits in inbox."""
        if isinstance(frame, commands.Connection.Close):
            self._send_quiet(0, commands.Connection.CloseOk())
            self.close_socket()
            raise ConnectionClosed(frame.reply_code, frame.reply_text)
        if isinstance(frame, commands.Channel.Close):
            self._send_quiet(channel, commands.Channel.CloseOk())
            raise ChannelClosed(channel, frame.reply_code, frame.reply_text)
        if not isinstance(frame, commands.Connection.Blocked | commands.Connection.Unblocked):
            # Blocked notices only concern connections that publish without waiting;
            # a blocking caller sees the wait for its confirm instead.
            self.inbox.append((channel, frame))

    def _send_quiet(self, channel: int, method: Any) -> None:
        try:
            self.send(channel, method)
        except ConnectionLost:
            pass

    # -- channels and setup ------------------------------------------------
    def open_channel(self, channel: int) -> None:
        self.rpc(channel, commands.Channel.Open(), commands.Channel.OpenOk)

    def close(self, timeout: float = 5.0) -> None:
        """Polite close: connection.close, wait for close-ok, drop the socket."""
        if self.sock is None:
            return
        try:
            self.rpc(0, commands.Connection.Close(200, "normal shutdown", 0, 0), commands.Connection.CloseOk, timeout=timeout)
        except AMQPError:
            pass
        finally:
            self.close_socket()

    def close_socket(self) -> None:
        if self.sock is not None:
            try:
                self.sock.close()
            except OSError:
                pass
            self.sock = None

    def publish(
        self,
        channel: int,
        exchange: str,
        routing_key: str,
        body: bytes,
        properties: commands.Basic.Properties,
        mandatory: bool = False,
    ) -> None:
        self.sendall(frames.encode_publish(channel, exchange, routing_key, body, properties, self.frame_max, mandatory))

