"""The thin network layer under the protocol: name resolution, a non-blocking TCP connect, TLS, send and recv.

Nothing here waits: name resolution runs in a short-lived helper thread when the host is
not an IP literal (getaddrinfo blocks and cannot be bounded), the TCP connect and the TLS
handshake are non-blocking, and recv/send take what the socket gives now. Every failure is
a ConnectionLost (TLSError for TLS, with the setting to look at), never an OSError. Owned
by one engine loop's thread (magne/engine/connection.py); only `_resolve` runs elsewhere.
"""

from __future__ import annotations

import enum
import ipaddress
import os
import selectors
import socket
import ssl
import threading
from typing import Any

from magne.amqp.errors import AMQPError, ConnectionLost, TLSError, URLError
from magne.amqp.url import Params, tls_context

READ, WRITE = selectors.EVENT_READ, selectors.EVENT_WRITE
RECV_SIZE = 262144
_WOULD_BLOCK = (BlockingIOError, InterruptedError, ssl.SSLWantReadError, ssl.SSLWantWriteError)


class Stage(enum.Enum):
    NEW = "new"
    RESOLVING = "resolving"
    CONNECTING = "connecting"
    TLS = "tls handshake"
    UP = "up"  # bytes flow: the protocol's handshake and everything after
    CLOSED = "closed"


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


class Transport:
    """One socket to one broker node. `early()` is asked by the owner: whether a failure now means the broker
    dropped us right after TLS (it then reads as a refused client certificate)."""

    def __init__(self, params: Params) -> None:
        self.params = params
        self.stage = Stage.NEW
        self.sock: socket.socket | ssl.SSLSocket | None = None
        self.deadline = 0.0
        self._addrs: list[tuple[Any, ...]] = []
        self._resolved: list[tuple[Any, ...]] | BaseException | None = None
        self._tls_wants = WRITE
        self.early = lambda: False  # set by the owner

    # -- connecting ------------------------------------------------------------------------------
    def start(self, now: float) -> None:
        """Begin connecting; returns at once. Progress comes from writable()/tick()."""
        p = self.params
        self.deadline = now + p.connect_timeout
        try:
            ipaddress.ip_address(p.host)
        except ValueError:
            self.stage = Stage.RESOLVING
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
        p = self.params
        if not self._addrs:
            raise ConnectionLost(f"cannot reach the broker at {p.host}:{p.port}: {error or 'no address'}")
        family, addr = self._addrs.pop(0)
        self.close()
        try:
            sock = socket.socket(family, socket.SOCK_STREAM)
        except OSError as exc:  # EMFILE, say: a failed attempt, not a crash
            raise ConnectionLost(f"cannot open a socket to {p.host}:{p.port}: {exc}") from None
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
        self.stage = Stage.CONNECTING

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
            self.stage = Stage.TLS
            self._tls_step()
        else:
            self.stage = Stage.UP

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
            self.stage = Stage.UP

    def tick(self, now: float) -> float | None:
        """Resolution and connect deadline; returns when it next needs a call (None once up)."""
        st = self.stage
        if st is Stage.RESOLVING:
            got = self._resolved
            if isinstance(got, BaseException):
                raise ConnectionLost(f"cannot resolve broker host {self.params.host!r}: {got}")
            if got is not None:
                self._addrs = list(got)
                self._connect_next()
            elif now >= self.deadline:
                raise ConnectionLost(f"resolving broker host {self.params.host!r} took over {self.params.connect_timeout:g}s")
            return now + 0.02
        if st in (Stage.CONNECTING, Stage.TLS):
            if now >= self.deadline:
                raise ConnectionLost(f"no answer from {self.params.host}:{self.params.port} within "
                                     f"{self.params.connect_timeout:g}s ({st.value})")
            return self.deadline
        return None

    # -- driving -------------------------------------------------------------------------------------
    def fileno(self) -> int:
        return self.sock.fileno() if self.sock is not None else -1

    def events(self, want_write: bool) -> int:
        """What to wait for on the socket now (0: nothing, e.g. while resolving)."""
        st = self.stage
        if self.sock is None or st in (Stage.RESOLVING, Stage.CLOSED, Stage.NEW):
            return 0
        if st is Stage.CONNECTING:
            return WRITE
        if st is Stage.TLS:
            return self._tls_wants
        return READ | WRITE if want_write else READ

    def writable(self) -> bool:
        """The socket is writable: advance the connect or TLS handshake. True once bytes may flow."""
        if self.stage is Stage.CONNECTING:
            self._connected()
        elif self.stage is Stage.TLS:
            self._tls_step()
        return self.stage is Stage.UP

    def recv(self) -> bytes | None:
        """What arrived (None: nothing yet, a spurious wake-up). ConnectionLost at EOF."""
        if self.stage is Stage.TLS:
            self._tls_step()
            return None
        sock = self.sock
        if sock is None or self.stage is not Stage.UP:
            return None
        try:
            data = sock.recv(RECV_SIZE)
            while isinstance(sock, ssl.SSLSocket) and sock.pending():  # decrypted bytes the selector cannot see
                data += sock.recv(RECV_SIZE)
        except _WOULD_BLOCK:
            return None
        except ssl.SSLError as exc:  # TLS 1.3: a refused client certificate shows on the first read
            raise tls_error(self.params, exc, early=self.early()) from None
        except OSError as exc:
            raise ConnectionLost(f"receive failed: {exc}") from None
        if not data:
            raise ConnectionLost("the broker closed the socket")
        return data

    def send(self, data: memoryview) -> int:
        """Bytes the socket took now (0 if full)."""
        assert self.sock is not None
        try:
            return self.sock.send(data)
        except _WOULD_BLOCK:
            return 0
        except ssl.SSLError as exc:
            raise tls_error(self.params, exc, early=self.early()) from None
        except OSError as exc:
            raise ConnectionLost(f"send failed: {exc}") from None

    def close(self) -> None:
        if self.sock is not None:
            try:
                self.sock.close()
            except OSError:
                pass
            self.sock = None

    def shutdown(self) -> None:
        """Abort: shut the socket down for every process that shares it (a task's forked child may hold a copy of
        its fd: close() alone would leave the broker connection up until that child exits), then close it."""
        if self.sock is not None:
            try:
                self.sock.shutdown(socket.SHUT_RDWR)
            except (OSError, ValueError):
                pass
        self.close()
        self.stage = Stage.CLOSED


__all__ = ["AMQPError", "READ", "WRITE", "Stage", "Transport", "tls_error"]
