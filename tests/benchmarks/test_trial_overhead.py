"""benchmarks/trial_overhead.py's table, built from events recorded through cglab.track.timeline (no Ray, no
timing): rows in the order a trial runs, each the difference from the phase before it, a pre-started process's
start left out, per step / steps / overhead as the script defines them, the Tune gap before each trial; every
phase the platform records has its row, and every row is recorded somewhere."""

from __future__ import annotations

import json
import random
import re
import sys
from pathlib import Path

import pytest

from cglab.track import timeline

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "benchmarks"))
import trial_overhead as to  # noqa: E402

STEPS = 20


def _recorded(times: dict[str, float]) -> list[dict]:
    """`times` recorded in a shuffled order through the timeline, handed back and read as the driver reads them."""
    timeline.hand_back()  # nothing left over from another test
    phases = list(times)
    random.Random(0).shuffle(phases)
    for p in phases:
        timeline.mark(p, at=times[p])
    return timeline.events(timeline.hand_back())


def _times(start: float = 1000.0) -> dict[str, float]:
    """Every phase in ORDER, the i-th one (i + 1) seconds after the one before it (distinct gaps)."""
    t, out = start, {}
    for i, p in enumerate(to.ORDER):
        t += i + 1 if i else 0
        out[p] = t
    return out


def test_rows_are_in_run_order_and_each_is_the_difference_from_the_phase_before():
    times = _times()
    trial = to.breakdown("clm-1", _recorded(times), STEPS)
    assert list(trial.rows) == list(to.ORDER)
    assert trial.rows[to.ORDER[0]] is None  # the first phase has nothing before it
    for prev, phase in zip(to.ORDER, to.ORDER[1:]):
        assert trial.rows[phase] == pytest.approx(times[phase] - times[prev])
    assert trial.wall == pytest.approx(times["trial end"] - times["trial start"])


def test_per_step_steps_and_overhead_as_defined():
    times = _times()
    trial = to.breakdown("clm-1", _recorded(times), STEPS)
    per_step = (times["last step done"] - times["first step done"]) / (STEPS - 1)
    assert trial.per_step == pytest.approx(per_step)
    assert trial.steps_s == pytest.approx(STEPS * per_step)
    assert trial.overhead == pytest.approx(times["trial end"] - times["trial start"] - STEPS * per_step)


def test_a_pre_started_process_is_left_out_and_the_next_phase_counts_from_the_one_before():
    times = _times()
    times["worker process start"] = times["trial start"] - 50  # Ray's worker pool started it long before
    trial = to.breakdown("clm-1", _recorded(times), STEPS)
    assert trial.rows["worker process start"] is None
    assert trial.rows["worker imports done"] == pytest.approx(
        times["worker imports done"] - times["trainer.fit called"]
    )


def test_a_trial_actor_reused_from_an_earlier_trial_is_not_counted_as_this_trials_start():
    a, b = _times(1000.0), _times(5000.0)
    b["trial process start"] = a["trial start"] - 3  # Tune's reuse_actors: b runs in a's actor (same pid)
    run = {
        "steps": STEPS,
        "sweep_start": 900.0,
        "sweep_wall": 9000.0,
        "trials": {"a": _recorded(a), "b": _recorded(b)},
        "driver": [{"phase": "tuner.fit called", "t": 990.0, "pid": 1, "host": "h"}],
        **dict(load_start=[0, 0, 0], load_end=[0, 0, 0], lesson=2, preset="laptop", seeds=[1], overrides=[]),
        **dict(commit="c", started=0, machine="m", note=""),
    }
    rows = {line.split("  ")[0]: line.split()[-3:] for line in to.report(run) if line.startswith("trial start ")}
    assert rows["trial start"][:2] == [f"{a['trial start'] - a['trial process start']:.2f}", "-"]
    reused = to.breakdown("b", _recorded(b), STEPS, reused=True)
    assert reused.rows["trial start"] is None and reused.wall == pytest.approx(b["trial end"] - b["trial start"])


def test_a_phase_recorded_twice_counts_at_its_last_record_and_a_missing_one_is_skipped():
    times = _times()
    events = _recorded(times)
    events.append({**events[0], "phase": "checkpoint report called", "t": times["checkpoint report called"] - 0.5})
    events = [e for e in events if e["phase"] != "eval model ready"]
    trial = to.breakdown("clm-1", events, STEPS)
    assert trial.rows["checkpoint report called"] == pytest.approx(
        times["checkpoint report called"] - times["last step done"]
    )
    assert trial.rows["eval model ready"] is None
    assert trial.rows["eval end"] == pytest.approx(times["eval end"] - times["eval entry"])


def test_the_tune_gap_is_from_tuner_fit_or_the_trial_that_ended_before():
    a, b = _times(1000.0), _times(5000.0)
    trials = [to.breakdown("a", _recorded(a), STEPS), to.breakdown("b", _recorded(b), STEPS)]
    to.place_in_sweep(trials, [{"phase": "tuner.fit called", "t": 990.0, "pid": 1, "host": "h"}])
    assert trials[0].before == pytest.approx(a["trial start"] - 990.0)
    assert trials[1].before == pytest.approx(b["trial start"] - a["trial end"])


def test_trials_side_by_side_counts_the_most_that_overlapped():
    a, b, c = _times(0.0), _times(100.0), _times(1e5)  # a and b overlap (a trial spans ~500 s), c runs alone
    trials = [to.breakdown(n, _recorded(t), STEPS) for n, t in (("a", a), ("b", b), ("c", c))]
    assert to.most_at_once(trials) == 2 and to.most_at_once([trials[0], trials[2]]) == 1


def test_the_table_has_a_row_per_phase_and_the_median_column():
    trials = [to.breakdown(n, _recorded(_times(s)), STEPS) for n, s in (("a", 0.0), ("b", 1e4), ("c", 2e4))]
    lines = to.table(trials)
    assert lines[0].split()[-4:] == ["a", "b", "c", "median"]
    row = next(line for line in lines if line.startswith("overhead (wall - steps)"))
    assert row.split()[-1] == f"{trials[0].overhead:.2f}"  # equal trials: the median is each
    for phase in to.ORDER:
        assert any(line.startswith(phase + " ") for line in lines), phase


def _recorded_in_code() -> set[str]:
    """The phase names the platform's calls into cglab.track.timeline record."""
    names: set[str] = set()
    for path in (REPO / "platform" / "cglab").rglob("*.py"):
        src = path.read_text()
        names.update(re.findall(r'timeline\.mark\(\s*"([^"]+)"', src))
        for who, phase, imported in re.findall(r'timeline\.begin\(\s*"([^"]+)",\s*"([^"]+)"(,\s*imported_at)?', src):
            names.update({f"{who} process start", phase} | ({f"{who} imports done"} if imported else set()))
        if "timeline.steps(" in src:
            names.update({"first step done", "last step done"})
    return names


def test_every_recorded_phase_has_its_row_and_every_row_is_recorded():
    code = _recorded_in_code()
    assert code - set(to.ORDER) - set(to.SWEEP) == set()
    assert set(to.ORDER) | set(to.SWEEP) <= code


@pytest.mark.parametrize(
    "name", ["trial_overhead_before", "trial_overhead_before_loaded", "trial_overhead_after", "trial_overhead_deferred"]
)
def test_the_committed_table_is_what_the_script_prints_from_the_committed_events(name):
    results = REPO / "benchmarks" / "results"
    run = json.loads((results / f"{name}.events.json").read_text())
    text = (results / f"{name}.txt").read_text()
    assert to.report(run) == text.splitlines()
    assert re.search(r"load average at start: [\d.]+ [\d.]+ [\d.]+; at end: [\d.]+", text) and "note: " in text
    assert len(run["trials"]) >= 4 and run["steps"] >= 20
