"""What every foreign parser returns, and the checks they share: nothing a producer wrote is trusted."""

from __future__ import annotations

import dataclasses
import math
from typing import Any

from magne import wire
from magne.errors import BadMessage

MAX_NAME = 1000  # characters of a task or actor name
MAX_ID = 255  # characters of a message id (an AMQP short string)
MAX_RETRIES = wire.MAX_RETRIES_VALUE
MAX_SECONDS = 10 * 365 * 86400.0  # a time limit or delay beyond ten years is not one anybody meant
MAX_EPOCH = 2**33  # seconds since 1970 (year 2242): an eta or expiry beyond it is forged


@dataclasses.dataclass(slots=True)
class Foreign:
    """One foreign message, validated. Set on Delivery.meta by magne.formats.resolve; read by policy.decide."""

    fmt: str  # "dramatiq" or "celery"
    task: str
    args: list[Any]
    kwargs: dict[str, Any]
    message_id: str | None
    retries: int  # retries already spent (by the old workers or by magne)
    eta: float | None  # when it may run, seconds since the epoch
    time_limit: float | None  # seconds
    expires: float | None  # seconds since the epoch
    home: str  # the queue its delayed copies go back to (dramatiq: `q` for a message from `q.DQ`)
    dead_to: str | None = None  # where a failure is dead-lettered; None: magne's `<queue>.dead`
    dead_declare: Any = None  # that queue's declaration, as its framework makes it


def field(kind: str, name: str, value: Any, want: str) -> BadMessage:
    """The one way a parser refuses a field: the field named, its value shown short and escaped."""
    return BadMessage(f"{kind} field {name!r} must be {want}, got {wire.safe_repr(value)}")


def text(kind: str, name: str, value: Any, limit: int, required: bool = True) -> str | None:
    if value is None and not required:
        return None
    if type(value) is not str or not value or len(value) > limit:
        raise field(kind, name, value, f"a non-empty string of at most {limit} characters")
    return value


def count(kind: str, name: str, value: Any) -> int:
    if value is None:
        return 0
    if type(value) is not int or not 0 <= value <= MAX_RETRIES:
        raise field(kind, name, value, f"an integer from 0 to {MAX_RETRIES}")
    return value


def seconds(kind: str, name: str, value: Any, scale: float = 1.0) -> float | None:
    """A positive duration (value x scale seconds), or None for null."""
    if value is None:
        return None
    try:
        ok = type(value) in (int, float) and math.isfinite(value) and 0 < value * scale <= MAX_SECONDS
    except OverflowError:  # an integer no float can hold (JSON allows 10**400): no duration anybody meant
        ok = False
    if not ok:
        raise field(kind, name, value, f"a positive number of {'milliseconds' if scale < 1 else 'seconds'}")
    return float(value) * scale


def args_kwargs(kind: str, args: Any, kwargs: Any, args_name: str = "args", kwargs_name: str = "kwargs"
                ) -> tuple[list[Any], dict[str, Any]]:
    if args is None:
        args = []
    elif type(args) is not list:
        raise field(kind, args_name, args, "a JSON array")
    if kwargs is None:
        kwargs = {}
    elif type(kwargs) is not dict:
        raise field(kind, kwargs_name, kwargs, "a JSON object")
    return args, kwargs
