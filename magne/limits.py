"""Queue length limits that drop messages in silence: found and said out loud.

A queue limited with `overflow: drop-head` (by its arguments or by a policy; it is RabbitMQ's default when a
length limit names no overflow) takes every
publish and throws the oldest message away when it is full: the publisher's confirm says
"taken", the worker never sees the message, and nothing is logged anywhere. magne's promise
"never dropped silently" holds with `reject-publish` (a full queue nacks, and the sender
reports or retries), not with drop-head, so `magne send --declare` and the worker look for
drop-head on the queues they use and warn about it.

Policies are invisible over AMQP; the management API shows a queue's arguments and its
effective policy. Where the management plugin does not answer, nothing is checked (a debug
line says so). Runs on the calling thread (the CLI) or on a short-lived thread of its own (the
worker, after it is ready): never on the I/O thread.
"""

from __future__ import annotations

import re
import threading
from typing import Any

from magne import logs
from magne.amqp.url import Params
from magne.status import Management, default_management_url

log = logs.Log("magne.limits")


def _limited(d: dict[str, Any], prefix: str = "") -> bool:
    """A length limit whose overflow drops the oldest: `drop-head`, or no overflow given (RabbitMQ's default)."""
    return d.get(f"{prefix}overflow", "drop-head") == "drop-head" and bool(d.get(f"{prefix}max-length")
                                                                            or d.get(f"{prefix}max-length-bytes"))


def effective(policies: list[dict[str, Any]], queue: str) -> dict[str, Any] | None:
    """The policy RabbitMQ applies to `queue`: of those whose pattern matches it and that apply to queues, the one of
    the highest priority (what the management API's `effective_policy_definition` shows, but read from the policies
    themselves: a queue's own view lags behind by up to the statistics interval)."""
    best = None
    for pol in policies:
        try:
            if pol.get("apply-to", "all") not in ("all", "queues", "classic_queues", "quorum_queues"):
                continue
            if not re.search(pol.get("pattern", "(?!)"), queue):
                continue
        except re.error:
            continue
        if best is None or pol.get("priority", 0) > best.get("priority", 0):
            best = pol
    return best


def check(params: Params, queues: list[str], management: str | None = None) -> list[tuple[str, str]]:
    """(queue, where the limit comes from) for each of `queues` limited with drop-head. [] if the management API does
    not answer (logged at debug level)."""
    api = Management(management or default_management_url(params), params)
    try:
        policies = list(api.get(f"/api/policies/{api.vhost}"))
    except Exception as exc:  # no management plugin, no permission: nothing to say
        log.debug("cannot check for drop-head limits through the management API: %s", exc)
        return []
    try:
        policies += [{**p, "operator": True} for p in api.get(f"/api/operator-policies/{api.vhost}")]
    except Exception:  # operator policies need an administrator's view: the user's own are what is checked then
        pass
    found = []
    for q in queues:
        user = effective([p for p in policies if not p.get("operator")], q)
        operator = effective([p for p in policies if p.get("operator")], q)
        for pol in (user, operator):
            if pol is not None and _limited(pol.get("definition") or {}):
                found.append((q, f"{'operator ' if pol.get('operator') else ''}policy {pol.get('name')}"))
                break
        else:
            try:
                if _limited(api.queue(q).get("arguments") or {}, "x-"):
                    found.append((q, "its arguments"))
            except Exception:  # a queue the statistics do not show yet
                pass
    return found


def warn(params: Params, queues: list[str]) -> None:
    """Log a warning for each drop-head queue. The calling thread."""
    for q, where in check(params, queues):
        log.warning("queue %s is limited with overflow drop-head (%s): when it is full RabbitMQ drops its oldest "
                    "messages in silence, confirmed sends and retries included; use overflow reject-publish (a full "
                    "queue then refuses, and magne reports or retries)", q, where, event="drop_head", queue=q)


def warn_in_background(params: Params, queues: list[str]) -> None:
    """The worker, once ready: check on a thread of its own (an HTTP call must not hold the main thread)."""
    threading.Thread(target=warn, args=(params, queues), name="magne-limits", daemon=True).start()
