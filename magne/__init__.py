"""magne: a RabbitMQ task worker with one connection, one channel and one I/O thread per process.

The public names are loaded on first use (PEP 562), so that importing a lower
layer (`magne.amqp`) never runs the upper ones: the package imports nothing eagerly.
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

_PUBLIC = {
    "task": "magne.registry", "Task": "magne.registry",
    "Publisher": "magne.publisher", "configure": "magne.publisher",
    "MagneError": "magne.errors", "ConfigError": "magne.errors", "BadMessage": "magne.errors",
    "PublishError": "magne.errors", "TimeLimitExceeded": "magne.errors", "Interrupt": "magne.errors",
    "Cancelled": "magne.errors", "cancel": "magne.cancels",
}

__all__ = [
    "BadMessage", "Cancelled", "ConfigError", "Interrupt", "MagneError", "PublishError", "Publisher", "Task", "TimeLimitExceeded",
    "__version__", "cancel", "configure", "task",
]

if TYPE_CHECKING:
    from magne.cancels import cancel
    from magne.errors import BadMessage, Cancelled, ConfigError, Interrupt, MagneError, PublishError, TimeLimitExceeded
    from magne.publisher import Publisher, configure
    from magne.registry import Task, task


def __getattr__(name: str) -> Any:
    module = _PUBLIC.get(name)
    if module is None:
        raise AttributeError(f"module 'magne' has no attribute {name!r}")
    value = getattr(import_module(module), name)
    globals()[name] = value
    return value
