"""The @task decorator and the registry: the only functions a message can reach."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, overload

from magne import message, topology


class Task:
    __slots__ = ("name", "fn", "queue", "time_limit", "__wrapped__", "__doc__")

    def __init__(self, fn: Callable[..., Any], name: str, queue: str, time_limit: float | None) -> None:
        self.fn = fn
        self.name = name
        self.queue = queue
        self.time_limit = time_limit
        self.__wrapped__ = fn
        self.__doc__ = fn.__doc__

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.fn(*args, **kwargs)

    def __repr__(self) -> str:
        return f"<task {self.name} queue={self.queue}>"

    def send(self, *args: Any, **kwargs: Any) -> str:
        """Publish one run of this task; returns its message id once the broker confirmed it."""
        return self.send_with_options(args=args, kwargs=kwargs)

    def send_with_options(self, args: Any = (), kwargs: dict[str, Any] | None = None, message_id: str | None = None) -> str:
        from magne.publisher import default_publisher

        mid = message_id or message.new_id()
        body = message.encode(self.name, args, kwargs, mid)
        default_publisher().publish(self.queue, body, message.properties(mid))
        return mid


REGISTRY: dict[str, Task] = {}


class RegistryError(ValueError):
    pass


@overload
def task(fn: Callable[..., Any], /) -> Task: ...
@overload
def task(
    *, name: str | None = None, queue: str | None = None, time_limit: float | None = None
) -> Callable[[Callable[..., Any]], Task]: ...


def task(
    fn: Callable[..., Any] | None = None,
    /,
    *,
    name: str | None = None,
    queue: str | None = None,
    time_limit: float | None = None,
) -> Any:
    """Register a function as a task. `@task` or `@task(queue=..., time_limit=...)`."""

    def register(f: Callable[..., Any]) -> Task:
        tname = name or f.__name__
        if time_limit is not None and time_limit <= 0:
            raise RegistryError(f"task {tname}: time_limit must be positive, got {time_limit}")
        t = Task(f, tname, queue or topology.default_queue(tname), time_limit)
        old = REGISTRY.get(tname)
        if old is not None and (old.fn.__module__, old.fn.__qualname__) != (f.__module__, f.__qualname__):
            raise RegistryError(
                f"two tasks are named {tname!r}: {old.fn.__module__}.{old.fn.__qualname__} "
                f"and {f.__module__}.{f.__qualname__}; give one of them name=..."
            )
        REGISTRY[tname] = t
        return t

    return register(fn) if fn is not None else register


def queues_of(tasks: dict[str, Task]) -> list[str]:
    return sorted({t.queue for t in tasks.values()})
