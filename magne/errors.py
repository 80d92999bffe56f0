"""magne's public exceptions, in one place: `from magne.errors import ...` or `from magne import ...`.

Every error shares the root `MagneError` (defined in the AMQP layer, the lowest
one, so that layer's errors are MagneErrors without importing upwards).

The interrupts are not errors: `TimeLimitExceeded` and `ColdShutdown` are raised
*into* a task's thread by the worker and derive from `BaseException`, like
KeyboardInterrupt, so that a task's `except Exception:` cannot swallow them.
"""

from __future__ import annotations

from magne.amqp.errors import (
    AMQPError,
    BrokerTimeout,
    ChannelClosed,
    ConnectionClosed,
    ConnectionLost,
    FrameError,
    MagneError,
    PublishError,
    TLSError,
    URLError,
)

__all__ = [
    "AMQPError", "BadMessage", "BrokerTimeout", "Cancelled", "ChannelClosed", "ColdShutdown", "ConfigError",
    "ConnectionClosed", "ConnectionLost", "FrameError", "Interrupt", "MagneError", "PublishError", "RegistryError",
    "ResultTimeout", "TLSError", "TaskFailed", "TimeLimitExceeded", "URLError",
]


# Exit codes, the same for every command (README "Exit codes"): 2 for what the user must
# fix (options, task modules, a URL, credentials, an unknown vhost), 1 for failures
# that may pass (broker unreachable, the worker crashed).
EXIT_OK, EXIT_FAILED, EXIT_CONFIG = 0, 1, 2


class ConfigError(MagneError):
    """Something the user must fix before a worker can start (bad option, task module that does not import)."""

    permanent = True


class RegistryError(ConfigError, ValueError):
    """A bad @task declaration (two tasks with one name, a non-positive time limit, ...)."""


class BadMessage(MagneError):
    """A message the worker cannot run; it is dead-lettered with this reason, never retried."""


class Interrupt(BaseException):
    """Raised inside a task's thread by the worker. A BaseException so `except Exception` lets it through."""


class TimeLimitExceeded(Interrupt):
    """The task ran past its time limit; its message is retried if it has retries left, else dead-lettered."""


class ColdShutdown(Interrupt):
    """The worker is stopping cold; the task's message is requeued."""


class Cancelled(Interrupt):
    """The message was cancelled (`magne.cancel`): raised in its task's thread if it was running (an `async def`
    task is cancelled instead); its message is acked as cancelled, never retried nor dead-lettered."""
class TaskFailed(MagneError):
    """magne.result(): the message's final outcome was a failure (the task raised after its retries, ran past its
    time limit, named no registered task, ...). The text names the remote exception type and message; `error_type`,
    `error_message`, `reason`, `task`, `message_id` and `traceback` (text, "" when there is none) say more."""

    def __init__(self, message_id: str, task: str, reason: str, error_type: str, error_message: str,
                 traceback: str = "") -> None:
        self.message_id, self.task, self.reason = message_id, task, reason
        self.error_type, self.error_message, self.traceback = error_type, error_message, traceback
        super().__init__(f"task {task or '?'} (message {message_id}) failed ({reason}): {error_type}: {error_message}")

    def __reduce__(self) -> tuple[object, ...]:
        return (type(self), (self.message_id, self.task, self.reason, self.error_type, self.error_message,
                             self.traceback))


class ResultTimeout(MagneError, TimeoutError):
    """magne.result(): no final outcome of the message arrived within the timeout (it is still queued, running,
    retrying, or no worker consumes its queue)."""
