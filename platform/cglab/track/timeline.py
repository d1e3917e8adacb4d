"""Where a run's wall time goes: (phase, wall time, pid, host) events the code records itself.

A trial crosses four processes (the Tune trial function, the task that runs `fit`, the Ray Train workers, the
evaluation task), each keeping its own events here, in memory. They reach the driver in-band, with what each
process already hands back to its caller: a worker's events ride in every `ray.train.report` (the last report is
`fit`'s result), `fit` returns them with its own in its result dict, the evaluation in its `CheckpointEval`, and
the trial function in its Tune result (`run_lesson`'s rows keep `timeline`). So no shared file system, extra
service or MLflow write is needed, and nothing is sent that was not being sent anyway
(benchmarks/trial_overhead.py turns them into a table).

Recording is a list append (cost: microseconds a trial) and never raises: a broken timeline must not fail a run.
Wall times (time.time()) compare across processes of one host; `host` says which clock an event read.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import time
from typing import Any

log = logging.getLogger(__name__)

_HOST = socket.gethostname()
_events: list[dict[str, Any]] = []


def mark(phase: str, at: float | None = None) -> None:
    """Record that `phase` happened now (or at wall time `at`) in this process."""
    try:
        _events.append(
            {"phase": phase, "t": time.time() if at is None else float(at), "pid": os.getpid(), "host": _HOST}
        )
    except Exception as err:  # never fail a run over its bookkeeping
        log.debug("timeline: %s not recorded: %s", phase, err)


def begin(who: str, phase: str, imported_at: float | None = None) -> None:
    """Start this process's record afresh (a Ray task process is reused: a failed run's events must not join the
    next one's) with `<who> process start` (psutil: as the OS recorded it), `<who> imports done` at `imported_at`
    if given, then `phase`. A pre-started process (Ray's worker pool) started before the run: the reader drops it."""
    _events.clear()
    try:
        import psutil  # a cglab dependency

        mark(f"{who} process start", psutil.Process().create_time())
    except Exception as err:
        log.debug("timeline: no process start: %s", err)
    if imported_at is not None:
        mark(f"{who} imports done", imported_at)
    mark(phase)


def steps(step: int, first: int, last: bool) -> None:
    """`first step done` when `step` (just trained) is `first`; `last step done` when it is the run's `last`."""
    if step == first:
        mark("first step done")
    if last:
        mark("last step done")


def snapshot() -> str:
    """This process's events so far, as JSON (for a report that may be its last: the events stay)."""
    try:
        return json.dumps(_events)
    except Exception:
        return "[]"


def hand_back(*received: Any) -> str:
    """This process's events, removed from it, with those `received` from other processes (JSON strings as
    `snapshot`/`hand_back` return them, or None), as one JSON string for the caller."""
    out: list[dict[str, Any]] = []
    for r in received:
        out.extend(events(r))
    out.extend(_events)
    _events.clear()
    return json.dumps(out)


def events(encoded: Any) -> list[dict[str, Any]]:
    """The events in a JSON string from `snapshot`/`hand_back` ([] for None or anything unreadable)."""
    try:
        got = json.loads(encoded) if isinstance(encoded, str) else []
        return [e for e in got if isinstance(e, dict) and {"phase", "t", "pid", "host"} <= e.keys()]
    except Exception:
        return []
