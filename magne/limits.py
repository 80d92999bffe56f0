"""Queue length limits that drop messages in silence: found and said out loud.

(Two cases. A length limit with drop-head loses the oldest messages of the queue itself. And a
length limit on a due queue, `<queue>.due` (set by a policy whose pattern also matches it), loses
delayed messages and retry copies that fall due while it is full: they reach it by dead-lettering
from their wait queue, which RabbitMQ does at most once for a classic queue. A limit on the task
queue itself no longer does (magne.topology: delays fall due into `.due`); quorum wait queues
dead-letter at least once.)

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

from magne import logs, topology
from magne.amqp.url import Params
from magne.status import Management, default_management_url

log = logs.Log("magne.limits")


def overflow(d: dict[str, Any], prefix: str = "") -> str | None:
    """A length limit's overflow behaviour (`drop-head` when none is given: RabbitMQ's default), or None: no limit."""
    if not (d.get(f"{prefix}max-length") or d.get(f"{prefix}max-length-bytes")):
        return None
    return str(d.get(f"{prefix}overflow", "drop-head"))


def _limited(d: dict[str, Any], prefix: str = "") -> bool:
    """A length limit whose overflow drops the oldest."""
    return overflow(d, prefix) == "drop-head"


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


def check(params: Params, queues: list[str], management: str | None = None) -> list[tuple[str, str, str]]:
    """(queue, its overflow, where the limit comes from) for each of `queues` that has a length limit. [] if the
    management API does not answer (logged at debug level)."""
    api = Management(management or default_management_url(params), params)
    try:
        policies = list(api.get(f"/api/policies/{api.vhost}"))
    except Exception as exc:  # no management plugin, no permission: nothing to say
        log.debug("cannot check for queue length limits through the management API: %s", exc)
        return []
    try:
        policies += [{**p, "operator": True} for p in api.get(f"/api/operator-policies/{api.vhost}")]
    except Exception:  # operator policies need an administrator's view: the user's own are what is checked then
        pass
    found = []
    for q in queues:
        user = effective([p for p in policies if not p.get("operator")], q)
        operator = effective([p for p in policies if p.get("operator")], q)
        try:
            args = api.queue(q).get("arguments") or {}
        except Exception:  # a queue the statistics do not show yet
            args = {}
        how = applied_overflow((user or {}).get("definition") or {}, args)
        for pol in (user, operator):
            if pol is not None and overflow(pol.get("definition") or {}) is not None:
                found.append((q, how, f"{'operator ' if pol.get('operator') else ''}policy {pol.get('name')}"))
                break
        else:
            if overflow(args, "x-") is not None:
                found.append((q, how, "its arguments"))
    return found


def applied_overflow(policy: dict[str, Any], args: dict[str, Any]) -> str:
    """The overflow RabbitMQ applies to a queue: the (user) policy's or the queue's own x-overflow, whichever is given
    (an operator policy cannot set one); given by both, a quorum queue takes the policy's and a classic queue its
    argument's; by neither, drop-head. A length limit from a policy does not bring drop-head with it."""
    pol, arg = policy.get("overflow"), args.get("x-overflow")
    if pol and arg:
        return str(pol if args.get("x-queue-type") == "quorum" else arg)
    return str(pol or arg or "drop-head")


def warn(params: Params, queues: list[str], queue_types: dict[str, str] | None = None) -> None:
    """Log a warning for each queue (or its due queue) whose length limit can lose messages in silence. The calling
    thread."""
    due = {topology.due_queue(q): q for q in queues}
    for q, how, where in check(params, [*queues, *due]):
        if how == "drop-head":
            log.warning("queue %s is limited with overflow drop-head (%s): when it is full RabbitMQ drops its oldest "
                        "messages in silence, confirmed sends and retries included; use overflow reject-publish (a full "
                        "queue then refuses, and magne reports or retries)", q, where, event="drop_head", queue=q)
        elif q in due and (queue_types or {}).get(due[q], "classic") == "classic":
            log.warning("queue %s, where the delayed messages and retry copies of queue %s fall due, has a length limit "
                        "(%s, overflow %s): one that falls due while it is full is dropped by RabbitMQ (a classic wait "
                        "queue dead-letters at most once). Scope the policy to the task queue's exact name, or use "
                        "quorum queues (their wait queues dead-letter at least once)", q, due[q], where, how,
                        event="length_limit", queue=due[q])


def warn_in_background(params: Params, queues: list[str], queue_types: dict[str, str]) -> None:
    """The worker, once ready: check on a thread of its own (an HTTP call must not hold the main thread)."""
    threading.Thread(target=warn, args=(params, queues, queue_types), name="magne-limits", daemon=True).start()
