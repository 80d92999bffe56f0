"""Groups that end in a callback (chords): how the callback runs once, however often a member runs.

The application (magne.steps.Group.then) makes, per chord, a *gate*: a durable quorum queue holding exactly one
message, the callback, that dead-letters into the callback's task queue (at-least-once dead-lettering). Then it
publishes the members. Each member that succeeds does this on its pool thread, before its ack (docs/results.md):

1. publishes its result record (with a nonce) to the results stream, confirmed;
2. reads the stream (the process's shared follower) up to that very record, counting which members had succeeded
   by then, in stream order. The member whose record completes the set sees all n; a member that ran twice, or
   finished after the set was complete, sees all n too;
3. if it saw all n: takes the gate's message (basic.get: one taker at a time, atomically) and rejects it without
   requeue, which makes the broker move it to the callback's queue. A later taker finds the gate empty: the
   callback is published once. A taker that dies before its reject leaves the message in the gate (unacked
   messages go back when a connection dies), and its member, unacked too, runs again and takes it then.

The callback's run gets the members' values (read from the stream, in member order) as its last argument. A group
that ends a pipeline (magne.steps) has no gate: its members join the same way, and the one that completes the set
records the list under the group's id (`collect`) instead of taking a gate.
A member that fails for good records the chord's failure; the callback then never runs and its gate expires.

Pool threads (or an executor thread for an `async def` member): the blocking calls go through the process's
default publisher's connection (MAGNE_URL), never the worker's consuming connection.
"""

from __future__ import annotations

import os
import time
from typing import Any

from pamqp import commands

from magne import followers, logs, results, wire, workflow
from magne.amqp import codec, names
from magne.amqp.errors import ChannelClosed
from magne.delivery import Delivery, Outcome
from magne.engine.session import CH
from magne.errors import TaskFailed
from magne.publisher import Publisher, default_publisher

log = logs.Log("magne.chords")
JOIN_TIMEOUT = 60.0  # a member waits this long to see its own record in the stream; else it runs again later
MAX_MEMBERS = 1_000_000
HELD_WAIT, HELD_POLL = 5.0, 0.25  # a redelivered member's look for a callback held by a taker that died (fire)
GROUP_ID = workflow.CHORD_GROUP


def gate_queue(group: str) -> str:
    """The gate of a chord: named after the results stream (one prefix for an operator to find, and to clean)."""
    return f"{workflow.STREAM}.chord.{group}"


def member_flow(d: Delivery) -> dict[str, Any] | None:
    """The flow of a chord member (its group, index, size and gate), or None. Cold path: messages that asked."""
    flow = workflow._flow(workflow._headers(d))
    group, i, n = flow.get("group"), flow.get("i"), flow.get("n")
    if not (isinstance(group, str) and type(i) is int and type(n) is int and 0 <= i < n <= MAX_MEMBERS):
        return None
    # A publisher controls the header: the gate taken from is always this group's own, never a queue it names.
    # The size must be the one its id names: a forged smaller one would fire the chord before its members ran.
    # A group that ends a pipeline has no gate: its list is recorded under its own id (`collect`, magne.steps).
    m = GROUP_ID.fullmatch(group)
    joins = flow.get("gate") == gate_queue(group) or flow.get("collect") is True
    return flow if joins and m is not None and int(m.group(1)) == n else None


def on_success(d: Delivery, task: str, value: Any) -> None:
    """Pool thread, after a task that asked succeeded: magne.workflow's follow-ups; and for a chord member, its join
    (blocking: the broker's confirm, the stream, the gate). A join that cannot finish requeues the member."""
    workflow.on_success(d, task, value)
    if b"gate" not in d.header and b"collect" not in d.header:  # no joining member (the common case: decoding the
        return  # header again costs 10 us)
    flow = member_flow(d)
    if flow is None or not isinstance(default_publisher(), Publisher):  # magne.testing joins in-process (local_fire)
        return
    try:
        join(d, task, value, flow)
    except Exception as exc:
        log.error("chord member %s could not join its group (%s: %s); it goes back to its queue and runs again",
                  d.message_id(), type(exc).__name__, exc, event="chord_join_failed")
        d.outcome, d.follow = Outcome.REQUEUE, None


def join(d: Delivery, task: str, value: Any, flow: dict[str, Any]) -> None:
    group, index = flow["group"], flow["i"]
    n = flow.get("n")
    mid = wire.read_state(d.header).message_id or f"{group}.{index}"
    rid = os.urandom(12).hex()
    own = workflow.record(mid, task, True, value, extra={"group": group, "i": index, "rid": rid})
    pub = default_publisher()
    d.follow = [f for f in d.follow or () if f.routing_key != workflow.STREAM or f.message_id != mid] or None
    r = followers.reader(pub)
    w, f = r.waiter(mid, rid=rid, fresh=True)  # registered before its record is published
    try:
        client = pub._running()
        client.publish_confirmed("", workflow.STREAM, own.body, own.header)
        deadline = time.monotonic() + JOIN_TIMEOUT
        while not w.signal.wait(followers.SLICE):
            if time.monotonic() > deadline:
                raise TimeoutError(f"its own record did not show in the stream within {JOIN_TIMEOUT:g}s")
            if f.lost:  # the follower's consumer is gone (refused after a reconnect): read on through another
                f = r.refollow(w, f)
    finally:
        r.done(w, f)
    assert w.record is not None
    succeeded = w.record.get("succeeded")
    if succeeded != n and r.may_be_short(group):  # its shared count was dropped once: count this group alone
        succeeded = r.recount(group, rid, w.start, max(1.0, deadline - time.monotonic()))
    if succeeded != n:
        return  # not every member had succeeded before this one: a later one completes the set
    if flow.get("collect") is True:
        collect(client, group, n, deadline)
    else:
        fire(client, gate_queue(group), d.redelivered)


def collect(client: Any, group: str, n: int, deadline: float) -> None:
    """A group that ends a pipeline is complete: record its members' values (read from the stream, in member order)
    under the group's id, the pipeline's result, confirmed before this member is acked. A member that runs again
    records it again (readers take the first record of an id: the same list, made of the members' first records)."""
    try:
        values = [results.result(f"{group}.{i}", max(1.0, deadline - time.monotonic())) for i in range(n)]
        rec = workflow.record(group, "group", True, values)
    except TaskFailed as exc:  # a member's first record is a failure (it ran twice, and failed once)
        rec = workflow.record(group, exc.task, False, reason=exc.reason, of=exc.message_id,
                              error={"type": exc.error_type, "message": exc.error_message})
    client.publish_confirmed("", workflow.STREAM, rec.body, rec.header)
    log.info("group %s complete: its values are its pipeline's result", logs.clean(group), event="group_collected")


def fire(client: Any, gate: str, redelivered: bool = False) -> None:
    """Move the callback out of its gate (to its task queue, by dead-lettering), unless someone did already. The
    passive declare after the reject returns only once the channel handled the reject (frames are handled in order):
    the member is acked only after that.

    An empty gate usually means taken. But a member run again because its worker died (`redelivered`) may be the
    re-run of the taker itself, killed while it held the callback: the broker gives the callback back to the gate when
    it handles that connection's end, which can come after the member's own redelivery (another connection, another
    queue). Taking "empty" for "taken" then would ack the only member that could still take it, and the callback
    would wait in its gate forever. So such a member looks again, until the callback shows (it takes it), the gate
    is gone (the callback runs), or HELD_WAIT passed. A killed process's connections end together, and the broker
    gives back within milliseconds; a taker cut off by the network is noticed per connection, after a heartbeat
    timeout, and may still come back too late (HELD_WAIT is short: a redelivered member that ran twice waits that
    long on a pool thread, and the callback may need that thread).
    """
    patient_until = time.monotonic() + (HELD_WAIT if redelivered else 0.0)
    refused = 0
    while True:
        try:
            got = client.get(gate)
        except ChannelClosed as exc:
            if exc.code != 404:
                raise
            return  # the callback ran and deleted its gate (drop_gate): taken long ago
        if got is None:
            if time.monotonic() >= patient_until:
                return  # taken already (or being taken by a live member that will finish it, or run again)
            if patient_until - time.monotonic() > HELD_WAIT - HELD_POLL:
                log.info("the gate %s is empty for a member run again: looking again for up to %gs, in case a taker "
                         "that died still holds the callback", logs.clean(gate), HELD_WAIT, event="chord_gate_empty")
            time.sleep(HELD_POLL)
            continue
        tag, gen = got[0], client.session.gen
        data = codec.encode_reject(CH, tag, False)
        client.submit(lambda data=data, gen=gen: client.session.write(data, gen))
        try:
            ready, _consumers = client.queue_counts(gate)
        except ChannelClosed as exc:  # the callback already ran and deleted its gate: our reject was handled
            if exc.code != 404:
                raise
            ready = 0
        if ready == 0:
            log.info("chord %s complete: its callback is on its way", logs.clean(gate), event="chord_fired")
            return
        refused += 1
        if refused >= 3:
            raise RuntimeError(f"the callback in {gate} could not be taken out (the channel was reopened meanwhile)")


def callback_args(d: Delivery, args: list[Any]) -> list[Any]:
    """Pool thread, before a chord's callback runs: its arguments plus the members' values in member order (read from
    the results stream). TaskFailed if a member's recorded outcome is a failure."""
    if b"chord" not in d.header:  # every message that asked comes here: most are no chord's callback
        return args
    flow = workflow._flow(workflow._headers(d))
    group, n = flow.get("chord"), flow.get("n")
    # A publisher controls the header: a chord id as magne makes it, its size the one the id names (a forged size
    # would hold a pool thread reading a million results that never come).
    m = GROUP_ID.fullmatch(group) if isinstance(group, str) else None
    if m is None or type(n) is not int or n != int(m.group(1)) or not 0 < n <= MAX_MEMBERS:
        return args
    deadline = time.monotonic() + JOIN_TIMEOUT
    values = [results.result(f"{group}.{i}", max(0.0, deadline - time.monotonic())) for i in range(n)]
    drop_gate(group)
    return [*args, values]


def drop_gate(group: str) -> None:
    """The callback is running, so it left its gate: delete the gate now rather than leave a quorum queue (a Raft
    group on every node) for a week per chord. Not earlier: with at-least-once dead-lettering the gate holds the
    callback until its task queue confirmed it. A member that runs again later finds no gate (fire: taken).
    Pool thread, before the callback runs; a failure only leaves the gate to expire."""
    pub = default_publisher()
    if not isinstance(pub, Publisher):
        return
    try:
        pub._running().call(names.QueueDelete(queue=gate_queue(group)), commands.Queue.DeleteOk)
    except Exception as exc:  # noqa: BLE001 - the gate expires by itself (x-expires)
        log.warning("the gate of chord %s could not be deleted (%s); it expires in a week", logs.clean(group),
                    type(exc).__name__, event="chord_gate_kept")


def local_fire(d: Delivery, records: dict[str, Any], groups: dict[str, set[int]],
               gates: dict[str, tuple[bytes, bytes]]) -> tuple[str, bytes, bytes] | None:
    """magne.testing's join, in-process: after a group's member succeeded (its record kept in `records`), the callback
    (queue, body, header) with the members' values appended, once every member succeeded; else None. A group that
    ends a pipeline gets its list recorded under its id instead."""
    flow = member_flow(d) if d.outcome is Outcome.ACK else None
    if flow is None:
        return None
    if records.get(f"{flow['group']}.{flow['i']}", {}).get("ok") is not True:
        return None  # its value was not JSON: it failed (its group's failure is recorded), its group never completes
    seen = groups.setdefault(flow["group"], set())
    seen.add(flow["i"])
    if len(seen) != flow.get("n"):
        return None
    values = [results.outcome(records[f"{flow['group']}.{i}"]) for i in range(flow["n"])]
    if flow.get("collect") is True:
        records.setdefault(flow["group"], {"id": flow["group"], "task": "group", "ok": True, "value": values})
        return None
    if flow["gate"] not in gates:
        return None
    body, header = gates.pop(flow["gate"])
    name, args, kwargs = wire.decode(body)
    mid = wire.read_state(header).message_id or ""
    headers = codec.decode_properties(header).headers or {}
    cflow = workflow._flow(headers)
    body = wire.encode(name, [*args, values], kwargs, mid)
    rest = {k: v for k, v in cflow.items() if k not in ("chord", "n", "queue")}  # a pipeline's step goes on after it
    return str(cflow.get("queue")), body, workflow.header_for(mid, len(body), headers.get(workflow.RESULTS) is True,
                                                              rest or None)
