"""Cancelling an id that already finished says so (magne.outcomes), on the real broker: a message that succeeded, one
dead-lettered, one that asked for its result, one still queued and one never sent each get the right answer, from
`magne.cancel` and from `magne cancel` (text and JSON), within the lookup's deadline and with no worker up."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import uuid

import magne
from magne import events, wire, workflow
from magne.outgoing import Target
from support import ROOT, URL, wait_for

MODULES = ("control_tasks",)


def seen_in_events(pub, ids):
    got: dict[str, str] = {}
    events.follow(pub._running(), lambda batch: got.update({e["id"]: e["event"] for e in batch}), time.time() - 60)
    wait_for(lambda: set(ids) <= set(got), 15, what=f"the events of {ids}: {got}")
    return got


def cli(fleet, *args):
    env = {**os.environ, "MAGNE_URL": URL, **{k: v for k, v in fleet.items() if k.startswith("MAGNE_")}}
    return subprocess.run([sys.executable, "-m", "magne", "cancel", *args], capture_output=True, text=True, timeout=60,
                          env=env, cwd=ROOT)


def test_finished_dead_lettered_queued_and_unknown_ids_each_say_what_is_known(fleet, pub, start_worker):
    main = fleet["main"]
    w = start_worker("--threads", "2", modules=MODULES)
    w.wait_ready()
    done = pub.send(Target("note", main), [1], message_id=uuid.uuid4().hex)  # a foreign id: read newest first
    dead = pub.send(Target("boom", main), [2])  # magne's own id: it carries its send time
    asked = pub.send(Target("note", main), [3], message_id=workflow.new_id(), headers={wire.RESULTS_HEADER: True})
    seen_in_events(pub, [done, dead, asked])
    assert w.stop() == 0
    queued = pub.send(Target("note", main), [4], message_id=workflow.new_id())  # no worker: it waits in its queue
    never = "never-sent-" + os.urandom(8).hex()

    t0 = time.monotonic()
    got = magne.cancel(done, dead, queued, never, asked, publisher=pub)
    took = time.monotonic() - t0
    assert got == [done, dead, queued, never, asked]  # as before: the ids, in order
    assert took < 3.0, took
    by = {r.id: r for r in got}
    assert (by[done].state, by[done].outcome, by[done].pid, by[done].task) == ("finished", "succeeded", w.pid, "note")
    assert by[done].host and by[done].at <= time.time()
    assert (by[dead].state, by[dead].outcome, by[dead].reason) == ("finished", "dead-lettered", "task raised")
    assert by[dead].error["type"] == "ValueError"
    assert (by[asked].state, by[asked].outcome) == ("finished", "succeeded")
    assert by[queued].state == "not-seen" and not by[queued].finished
    assert by[never].state == "not-seen" and by[never].since is None  # read through everything the streams keep

    out = cli(fleet, done, queued, "--format", "json")
    assert out.returncode == 0, out.stderr
    rows = json.loads(out.stdout)
    assert [(r["id"], r["state"]) for r in rows] == [(done, "finished"), (queued, "not-seen")]
    assert "since" not in rows[1]  # a uuid4 id among them: everything the streams keep was read
    assert rows[0]["outcome"] == "succeeded" and rows[0]["pid"] == w.pid

    out = cli(fleet, dead, queued)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[0].startswith(f"{dead}: already finished: dead-lettered (task raised: ValueError) at ")
    assert f"pid {w.pid}" in lines[0] and "the cancel is recorded anyway" in lines[0]
    # Both ids carry their send time: read from a minute before the older one
    assert lines[1].startswith(f"{queued}: cancelled: not finished as far as the records show since ")
    assert lines[1].endswith("it will not run if it has not started; if it is running it is interrupted")


def test_with_events_off_a_result_record_still_says_finished_and_the_rest_is_unknown(fleet, pub, redis,
                                                                                     start_worker):
    main = fleet["main"]
    w = start_worker("--events", "off", modules=MODULES)
    w.wait_ready()
    asked = pub.send(Target("note", main), [1], message_id=workflow.new_id(), headers={wire.RESULTS_HEADER: True})
    assert magne.result(asked, 15, publisher=pub) is None
    plain = pub.send(Target("note", main), [2], message_id=workflow.new_id())
    wait_for(lambda: redis.hget(f"{fleet['MAGNE_TEST_PREFIX']}:runs", "2") == b"1", 10, what="the plain one ran")
    got = magne.cancel(asked, plain, publisher=pub)
    assert (got[0].state, got[0].outcome, got[0].source) == ("finished", "succeeded", "results")
    assert got[1].state == "unknown" and "no task events" in got[1].note  # never "not finished"
    out = cli(fleet, plain)
    assert "not known whether it already finished (no task events to read" in out.stdout, out.stdout + out.stderr
    assert w.stop() == 0
