"""Every error magne raises, rooted in `MagneError`.

The root lives here, in the lowest layer, so that the AMQP layer's own errors are
MagneErrors without that layer importing anything above it; `magne.errors`
re-exports all of them with the errors of the upper layers. `permanent` marks what
retrying cannot fix (wrong password, unknown vhost, access refused): a supervisor
stops instead of restarting on those.
"""

from __future__ import annotations


class MagneError(Exception):
    """Root of every error magne raises (catch this to catch them all)."""

    permanent = False


class URLError(MagneError, ValueError):
    """A broker URL that cannot be used. Its text never contains the URL's user-info."""

    permanent = True


class AMQPError(MagneError):
    """A broker-side or network failure on an AMQP connection."""


class ConnectionLost(AMQPError):
    """The socket is gone: reset, EOF, missed heartbeats, unreachable broker, a timeout."""


class BrokerTimeout(ConnectionLost):
    """The broker did not answer within the time allowed (the connection is then abandoned)."""


class TLSError(ConnectionLost):
    """TLS could not be set up; `permanent` when a setting must change (untrusted CA, name mismatch, expired,
    a client certificate required or refused, unreadable certificate files)."""

    def __init__(self, text: str, permanent: bool = True) -> None:
        super().__init__(text)
        self.permanent = permanent


class FrameError(ConnectionLost):
    """The byte stream is not AMQP 0-9-1: the connection cannot continue."""


class ConnectionClosed(AMQPError):
    """The broker closed the connection with connection.close (the close-ok was answered)."""

    # 403 ACCESS_REFUSED (login or vhost permissions), 530 NOT_ALLOWED (unknown vhost).
    PERMANENT_CODES = frozenset({403, 530})

    def __init__(self, code: int, text: str) -> None:
        super().__init__(f"broker closed the connection: {code} {text}")
        self.code = code
        self.text = text
        self.permanent = code in self.PERMANENT_CODES


class ChannelClosed(AMQPError):
    """The broker closed a channel with channel.close (406, 404, ...; the close-ok was answered)."""

    def __init__(self, channel: int, code: int, text: str) -> None:
        super().__init__(f"broker closed channel {channel}: {code} {text}")
        self.channel = channel
        self.code = code
        self.text = text


class PublishError(AMQPError):
    """The broker did not take a published message: nacked, returned as unroutable, or no confirm in time."""


_AS_PUBLISH: dict[type, type] = {}


def as_publish_error(error: MagneError) -> PublishError:
    """The exception a sending thread raises for `error`: always a PublishError (a lost connection becomes one
    that is also a ConnectionLost, and so on), and a fresh object per thread: one fault fails many senders, and
    one object raised in all of them would collect every thread's frames in its traceback and keep their
    locals alive."""
    cls = type(error)
    if not issubclass(cls, PublishError):
        cls = _AS_PUBLISH.get(cls) or _AS_PUBLISH.setdefault(cls, type(f"Publish{cls.__name__}", (PublishError, cls), {}))
    fresh = cls.__new__(cls)
    fresh.__dict__.update(error.__dict__)
    fresh.args = error.args
    return fresh
