"""magne: a RabbitMQ task worker with one connection, one channel and one I/O thread per process."""

__version__ = "0.1.0"

from magne.publisher import Publisher, configure  # noqa: E402
from magne.registry import Task, task  # noqa: E402

__all__ = ["Publisher", "Task", "configure", "task", "__version__"]
