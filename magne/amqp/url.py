"""Broker URL parsing, following the RabbitMQ URI spec (amqp:// and amqps://)."""

from __future__ import annotations

import dataclasses
import os
import ssl
from urllib.parse import parse_qs, unquote, urlsplit

from magne.amqp.errors import URLError

DEFAULT_URL = "amqp://guest:guest@localhost:5672/%2F"

__all__ = ["DEFAULT_URL", "Params", "URLError", "parse_url", "resolve_url", "tls_context"]


@dataclasses.dataclass(frozen=True)
class Params:
    host: str = "localhost"
    port: int = 5672
    username: str = "guest"
    password: str = dataclasses.field(default="guest", repr=False)
    vhost: str = "/"
    tls: bool = False
    heartbeat: int = 60
    connect_timeout: float = 10.0
    frame_max: int = 131072
    channel_max: int = 2047

    @property
    def server_name(self) -> str:
        """The name TLS checks the certificate against."""
        return self.host

    def safe_url(self) -> str:
        """The URL as it is safe to log: never with the password."""
        scheme = "amqps" if self.tls else "amqp"
        vhost = self.vhost.replace("%", "%25").replace("/", "%2F")
        return f"{scheme}://{self.username}@{self.host}:{self.port}/{vhost}"


def resolve_url(url: str | None) -> str:
    return url or os.environ.get("MAGNE_URL") or DEFAULT_URL


def parse_url(url: str) -> Params:
    parts = urlsplit(url)
    if parts.scheme not in ("amqp", "amqps"):
        raise URLError(f"broker URL must start with amqp:// or amqps://, got {parts.scheme or 'no'} scheme")
    tls = parts.scheme == "amqps"
    try:
        port = parts.port or (5671 if tls else 5672)
    except ValueError:
        # Not the exception's text: for a password with an unescaped '#', '/' or '?'
        # urllib puts the password in it.
        raise URLError("bad port in broker URL (a password with '#', '/', '?' or '@' must be percent-encoded)") from None
    # The spec: no path means the default vhost "/"; "/x" means vhost "x" (percent-decoded).
    path = parts.path
    vhost = unquote(path[1:]) if len(path) > 1 else "/"
    kwargs: dict[str, object] = {}
    for key, values in parse_qs(parts.query).items():
        value = values[-1]
        try:
            if key == "heartbeat":
                kwargs["heartbeat"] = int(value)
            elif key in ("connection_timeout", "connect_timeout"):
                # RabbitMQ's URI query uses milliseconds for connection_timeout.
                kwargs["connect_timeout"] = int(value) / 1000.0
            elif key == "frame_max":
                kwargs["frame_max"] = int(value)
            elif key == "channel_max":
                kwargs["channel_max"] = int(value)
        except ValueError:
            raise URLError(f"broker URL query {key}={value!r} is not a number") from None
    return Params(
        host=parts.hostname or "localhost",
        port=port,
        username=unquote(parts.username) if parts.username is not None else "guest",
        password=unquote(parts.password) if parts.password is not None else "guest",
        vhost=vhost,
        tls=tls,
        **kwargs,  # type: ignore[arg-type]
    )


def tls_context(params: Params) -> ssl.SSLContext:
    """The TLS context for an amqps:// connection: the system's trusted CAs, host name checked."""
    return ssl.create_default_context()
