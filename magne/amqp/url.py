"""Broker URL parsing, following the RabbitMQ URI spec (amqp:// and amqps://), and the TLS context.

TLS settings use the names of RabbitMQ's URI query parameters (the ones other
clients read too): `cacertfile`, `certfile`, `keyfile`, `verify` (`verify_peer`,
the default, or `verify_none`), `server_name_indication` (a host name, or
`disable`), and `auth_mechanism` (`plain` or `external`). Where the URL does not
set them, MAGNE_TLS_CACERTFILE, MAGNE_TLS_CERTFILE and MAGNE_TLS_KEYFILE do. No
error raised here ever contains the URL's user-info.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import random
import ssl
from urllib.parse import parse_qs, unquote, urlsplit

from magne.amqp.errors import URLError

DEFAULT_URL = "amqp://guest:guest@localhost:5672/%2F"
ENV_TLS = {"cacertfile": "MAGNE_TLS_CACERTFILE", "certfile": "MAGNE_TLS_CERTFILE", "keyfile": "MAGNE_TLS_KEYFILE"}

__all__ = ["DEFAULT_URL", "KNOWN_QUERY", "Nodes", "Params", "URLError", "parse_url", "parse_urls", "query_warnings",
           "resolve_url", "resolve_urls", "split_urls", "tls_context"]


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
    cacertfile: str | None = None
    certfile: str | None = None
    keyfile: str | None = None
    verify: bool = True
    sni: str | None = None  # server_name_indication; "" means disabled
    auth_mechanism: str | None = None  # None: EXTERNAL when a client certificate is given and offered, else PLAIN

    @property
    def server_name(self) -> str | None:
        """The name TLS sends (SNI) and checks the certificate against; None when disabled."""
        if self.sni == "":
            return None
        return self.sni or self.host

    def safe_url(self) -> str:
        """The URL as it is safe to log: never with the password."""
        scheme = "amqps" if self.tls else "amqp"
        vhost = self.vhost.replace("%", "%25").replace("/", "%2F")
        return f"{scheme}://{self.username}@{self.host}:{self.port}/{vhost}"


def resolve_url(url: str | None) -> str:
    return url or os.environ.get("MAGNE_URL") or DEFAULT_URL


def split_urls(text: str) -> list[str]:
    """Several broker URLs in one string, separated by ',' or ';' (as celery and dramatiq users write them)."""
    return [u.strip() for u in text.replace(";", ",").split(",") if u.strip()]


def resolve_urls(urls: str | list[str] | None) -> list[str]:
    """The broker URLs: `--url` (given once or more, each may hold several), else MAGNE_URL, else the default."""
    given = [urls] if isinstance(urls, str) else list(urls or [])
    found = [u for text in given for u in split_urls(text)]
    return found or split_urls(os.environ.get("MAGNE_URL", "")) or [DEFAULT_URL]


def parse_urls(urls: str | list[str] | None) -> list[Params]:
    return [parse_url(u) for u in resolve_urls(urls)]


class Nodes:
    """The nodes of a cluster, and which one to use next.

    Starts from a random node, so that P processes given the same list spread over the
    cluster. `failed()` moves to the next node and says whether every node has now failed
    once in a row: only then should the caller back off. Owned by one thread (the I/O
    thread, or a blocking client's caller).
    """

    def __init__(self, params: list[Params], start: int | None = None) -> None:
        if not params:
            raise URLError("no broker URL given")
        self.all = params
        self.index = random.randrange(len(params)) if start is None else start % len(params)
        self.failures = 0  # failed attempts in a row, across nodes

    @property
    def current(self) -> Params:
        return self.all[self.index]

    def failed(self) -> bool:
        """The current node failed: move on. True when a whole round of nodes failed (time to back off)."""
        self.failures += 1
        self.index = (self.index + 1) % len(self.all)
        if self.failures >= len(self.all):
            self.failures = 0
            return True
        return False

    def succeeded(self) -> None:
        self.failures = 0


# The query parameters magne reads (RabbitMQ's URI names; connect_timeout is an alias of connection_timeout).
KNOWN_QUERY = ("heartbeat", "connection_timeout", "connect_timeout", "frame_max", "channel_max", "cacertfile",
               "certfile", "keyfile", "verify", "server_name_indication", "auth_mechanism")
# (lowest, highest, what the number is) of each numeric parameter: the AMQP field it goes into bounds it.
_RANGES = {"heartbeat": (0, 65535, "whole seconds, 0 for none"),
           "connection_timeout": (1, 2**31 - 1, "milliseconds, at least 1"),
           "frame_max": (0, 2**32 - 1, "bytes, 0 for the broker's limit"),
           "channel_max": (0, 65535, "channels, 0 for the broker's limit")}


def _int(key: str, value: str) -> int:
    low, high, what = _RANGES["connection_timeout" if key == "connect_timeout" else key]
    try:
        n = int(value)
    except ValueError:
        n = None
    if n is None or not low <= n <= high:
        raise URLError(f"broker URL query {key}={value[:40]!r}: must be an integer from {low} to {high} ({what})")
    return n


def query_warnings(url: str) -> list[str]:
    """One line per query parameter of `url` that magne does not read (ignored, as the URI spec has clients do),
    naming the closest known one when it looks misspelt. For the command line to log; never raises."""
    try:
        keys = parse_qs(urlsplit(url).query, keep_blank_values=True)
    except ValueError:
        return []
    out = []
    for key in keys:
        if key in KNOWN_QUERY:
            continue
        close = difflib.get_close_matches(key, KNOWN_QUERY, n=1)
        hint = f"; did you mean {close[0]!r}?" if close else f" (magne reads {', '.join(KNOWN_QUERY)})"
        out.append(f"broker URL query parameter {key[:40]!r} is not one magne knows and is ignored{hint}")
    return out


def parse_url(url: str) -> Params:
    try:
        parts = urlsplit(url)
    except ValueError:
        raise URLError("broker URL cannot be parsed (a password with '#', '/', '?' or '@' must be percent-encoded)") from None
    if parts.scheme not in ("amqp", "amqps"):
        raise URLError(f"broker URL must start with amqp:// or amqps://, got {parts.scheme[:20] or 'no'} scheme")
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
    kwargs = _query(parts.query)
    for key, env in ENV_TLS.items():
        if key not in kwargs and os.environ.get(env):
            kwargs[key] = os.environ[env]
    if kwargs.get("keyfile") and not kwargs.get("certfile"):
        raise URLError("broker URL has keyfile= without certfile=")
    return Params(
        host=parts.hostname or "localhost",
        port=port,
        username=unquote(parts.username) if parts.username is not None else "guest",
        password=unquote(parts.password) if parts.password is not None else "guest",
        vhost=vhost,
        tls=tls,
        **kwargs,  # type: ignore[arg-type]
    )


def _query(query: str) -> dict[str, object]:
    """The URL's query parameters (RabbitMQ's names) as Params fields."""
    kwargs: dict[str, object] = {}
    for key, values in parse_qs(query).items():
        value = values[-1]
        if key == "heartbeat":
            kwargs["heartbeat"] = _int(key, value)
        elif key in ("connection_timeout", "connect_timeout"):
            kwargs["connect_timeout"] = _int(key, value) / 1000.0  # RabbitMQ's URI query uses milliseconds
        elif key in ("frame_max", "channel_max"):
            kwargs[key] = _int(key, value)
        elif key in ("cacertfile", "certfile", "keyfile"):
            kwargs[key] = value
        elif key == "verify":
            if value not in ("verify_peer", "verify_none"):
                raise URLError(f"broker URL query verify={value[:40]!r}: use verify_peer or verify_none")
            kwargs["verify"] = value == "verify_peer"
        elif key == "server_name_indication":
            kwargs["sni"] = "" if value == "disable" else value
        elif key == "auth_mechanism":
            if value.lower() not in ("plain", "external"):
                raise URLError(f"broker URL query auth_mechanism={value[:40]!r}: use plain or external")
            kwargs["auth_mechanism"] = value.upper()
    return kwargs


def tls_context(params: Params) -> ssl.SSLContext:
    """The TLS context for an amqps:// connection.

    Trusted CAs: `cacertfile`, else the system's. The host name (or
    `server_name_indication`) is checked unless `verify=verify_none`. A client
    certificate (`certfile`, `keyfile`) is presented when given.
    """
    try:
        ctx = ssl.create_default_context(cafile=params.cacertfile)
        if params.certfile:
            ctx.load_cert_chain(params.certfile, params.keyfile)
    except FileNotFoundError as exc:
        raise URLError(f"TLS file not found: {exc.filename}") from None
    except (ssl.SSLError, OSError) as exc:
        raise URLError(f"TLS files cannot be used ({exc.__class__.__name__}: {exc})") from None
    if not params.verify:
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    elif params.server_name is None:
        ctx.check_hostname = False  # SNI disabled: the chain is still verified, the name is not
    return ctx
