"""cglab.track.timeline: a process's events start afresh with `begin` (its own start from the OS first), are handed
back once with those received from other processes, and recording never raises."""

from __future__ import annotations

import json
import os

import psutil

from cglab.track import timeline


def test_begin_starts_afresh_with_the_process_start_and_imports():
    timeline.mark("left over from a failed run")
    timeline.begin("worker", "worker_loop entry", imported_at=123.0)
    got = timeline.events(timeline.snapshot())
    assert [e["phase"] for e in got] == ["worker process start", "worker imports done", "worker_loop entry"]
    assert got[0]["t"] == psutil.Process().create_time() and got[1]["t"] == 123.0
    assert {e["pid"] for e in got} == {os.getpid()}
    timeline.hand_back()


def test_hand_back_merges_what_it_received_and_empties_the_process_record():
    timeline.hand_back()
    timeline.mark("fit entry", at=2.0)
    worker = json.dumps([{"phase": "first step done", "t": 3.0, "pid": 7, "host": "w"}])
    got = timeline.events(timeline.hand_back(worker, None, "not json"))
    assert [(e["phase"], e["t"]) for e in got] == [("first step done", 3.0), ("fit entry", 2.0)]
    assert timeline.events(timeline.hand_back()) == []


def test_steps_marks_the_first_and_the_last():
    timeline.hand_back()
    for step in range(3, 7):
        timeline.steps(step, first=3, last=step == 6)
    assert [e["phase"] for e in timeline.events(timeline.hand_back())] == ["first step done", "last step done"]


def test_recording_never_raises():
    timeline.hand_back()
    timeline.mark("bad time", at="not a number")  # type: ignore[arg-type]
    assert timeline.events(timeline.hand_back()) == []
    assert timeline.events([{"phase": "x"}]) == [] and timeline.events('[{"phase": "x"}]') == []
