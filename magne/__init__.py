"""magne: a RabbitMQ task worker with one connection, one channel and one I/O thread per process.

The public names are loaded on first use (PEP 562), so that importing a lower
layer (`magne.amqp`) never runs the upper ones: the package imports nothing eagerly
but its version, a constant (magne/amqp/version.py).
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING, Any

from magne.amqp.version import VERSION as __version__  # a constant, no imports

_PUBLIC = {
    "task": "magne.registry", "Task": "magne.registry",
    "Publisher": "magne.publisher", "configure": "magne.publisher",
    "MagneError": "magne.errors", "ConfigError": "magne.errors", "BadMessage": "magne.errors",
    "PublishError": "magne.errors", "TimeLimitExceeded": "magne.errors", "Interrupt": "magne.errors",
    "Cancelled": "magne.errors", "cancel": "magne.outcomes",
    "TaskFailed": "magne.errors", "ResultTimeout": "magne.errors",
    "result": "magne.results", "result_async": "magne.results", "pipeline": "magne.steps",
    "group": "magne.steps", "group_result": "magne.steps",
}

__all__ = [
    "BadMessage", "Cancelled", "ConfigError", "Interrupt", "MagneError", "PublishError", "Publisher", "ResultTimeout",
    "Task", "TaskFailed", "TimeLimitExceeded", "__version__", "cancel", "configure", "group", "group_result",
    "pipeline", "result", "result_async", "task",
]

if TYPE_CHECKING:
    from magne.errors import (
        BadMessage,
        Cancelled,
        ConfigError,
        Interrupt,
        MagneError,
        PublishError,
        ResultTimeout,
        TaskFailed,
        TimeLimitExceeded,
    )
    from magne.outcomes import cancel
    from magne.publisher import Publisher, configure
    from magne.registry import Task, task
    from magne.results import result, result_async
    from magne.steps import group, group_result, pipeline


def __getattr__(name: str) -> Any:
    module = _PUBLIC.get(name)
    if module is None:
        raise AttributeError(f"module 'magne' has no attribute {name!r}")
    value = getattr(import_module(module), name)
    globals()[name] = value
    return value
