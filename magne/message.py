"""The JSON wire format of a task message (documented in docs/wire-format.md)."""

from __future__ import annotations

import uuid
from typing import Any

import orjson
from pamqp import commands

CONTENT_TYPE = "application/json"


class BadMessage(Exception):
    """A message the worker cannot run; it is dead-lettered with this reason."""


def new_id() -> str:
    return uuid.uuid4().hex


def encode(task_name: str, args: Any = (), kwargs: dict[str, Any] | None = None, message_id: str | None = None) -> bytes:
    msg: dict[str, Any] = {"func": task_name, "args": list(args)}
    if kwargs:
        msg["kwargs"] = kwargs
    if message_id:
        msg["id"] = message_id
    try:
        return orjson.dumps(msg)
    except TypeError as exc:
        raise TypeError(f"arguments of task {task_name!r} are not JSON-serializable: {exc}") from None


def properties(message_id: str) -> commands.Basic.Properties:
    return commands.Basic.Properties(
        content_type=CONTENT_TYPE,
        delivery_mode=2,  # persistent: survives a broker restart in a durable queue
        message_id=message_id,
    )


def decode(body: bytes) -> tuple[str, list[Any], dict[str, Any]]:
    """Body → (task name, args, kwargs), or BadMessage saying what is wrong."""
    try:
        msg = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise BadMessage(f"body is not JSON: {exc}") from None
    if type(msg) is not dict:
        raise BadMessage(f"body is JSON {type(msg).__name__}, not an object")
    func = msg.get("func")
    if type(func) is not str:
        raise BadMessage("body has no string field 'func' naming the task")
    args = msg.get("args")
    if args is None:
        args = []
    elif type(args) is not list:
        raise BadMessage(f"'args' must be a JSON array, got {type(args).__name__}")
    kwargs = msg.get("kwargs")
    if kwargs is None:
        kwargs = {}
    elif type(kwargs) is not dict:
        raise BadMessage(f"'kwargs' must be a JSON object, got {type(kwargs).__name__}")
    return func, args, kwargs
