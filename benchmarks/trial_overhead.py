"""Where a lesson trial's wall time goes, from the timestamps the code records itself (cglab.track.timeline).

    PYTHONPATH=platform python benchmarks/trial_overhead.py [--lesson 2] [--seeds 1 2] [--steps 20]
        [--preset laptop] [--concurrent N] [--workdir DIR] [--out FILE] [--note TEXT] [override ...]
    PYTHONPATH=platform python benchmarks/trial_overhead.py --from-events WORKDIR/events.json [--out FILE]

Runs `cglab ablate LESSON --preset PRESET` at a tiny shape (train.train_steps=STEPS; overrides as key=value) on a
private local Ray and an MLflow server (cglab.track.server) under a fresh WORKDIR (a temporary one by default),
then prints one column per trial and the median: each row is the seconds from the previous recorded phase to this
one, in the order a trial runs (trial function, `fit` in its task, the Ray Train worker, the final evaluation, the
MLflow writes). A `process start` earlier than the phase before it is a process Ray had started beforehand (its
worker pool, or an earlier trial's task process reused): not this trial's cost, shown as `-`; the trial actor's
start is the first event, so `trial start` counts from it. Below them: per step = (last step done - first step done) /
(STEPS - 1); steps = STEPS x per step; trial wall = trial end - trial start; overhead = trial wall - steps; and
before the trial: the time from `tuner.fit` (or the end of the trial before it) to the trial function's start.
The run's events and conditions are kept in WORKDIR/events.json; `--from-events` prints its table again (e.g.
after a change to this script) without running anything.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

# The phases in the order a trial passes them; (who, phase) as recorded by cglab.track.timeline's callers.
ORDER = (
    "trial process start",  # tune/sweep.py: Tune's trial actor
    "trial start",  # the trial function
    "trial imports done",
    "config built",
    "mlflow run created",
    "fit process start",  # train/trainer.py: `fit` in a Ray task outside the trial's placement group
    "fit entry",
    "fit imports done",
    "ray ensured",
    "plan done",
    "data prepared",
    "plan logged",
    "trainer.fit called",
    "worker process start",  # train/loop.py: the Ray Train worker
    "worker imports done",
    "worker_loop entry",
    "parallel state ready",
    "model built",
    "resumed, feed and callbacks ready",
    "first step done",
    "last step done",
    "checkpoint report called",  # train/callbacks.py: RayReport, after the last step's other callbacks
    "trainer.fit returned",
    "fit task returned",  # back in the trial function
    "eval process start",  # eval/checkpoint_eval.py: the final evaluation in its Ray task
    "eval entry",
    "eval model ready",
    "eval end",
    "eval task returned",
    "mlflow final writes done",
    "trial end",
)
SWEEP = ("tuner.fit called", "tuner.fit returned")  # tune/sweep.py, on the driver


@dataclass
class Trial:
    """One trial's breakdown: `rows` phase -> seconds since the previous kept phase (None: not recorded, or a
    pre-started process)."""

    name: str
    start: float
    end: float
    rows: dict[str, float | None]
    per_step: float | None
    steps_s: float | None
    before: float | None = None  # Tune: from tuner.fit or the previous trial's end to this trial's start
    pids: dict[str, int] = field(default_factory=dict)

    @property
    def wall(self) -> float:
        return self.end - self.start

    @property
    def overhead(self) -> float | None:
        return None if self.steps_s is None else self.wall - self.steps_s


def last_times(events: list[dict]) -> dict[str, dict]:
    """phase -> its last event (a retried worker's or a later checkpoint's record replaces the earlier one)."""
    return {e["phase"]: e for e in sorted(events, key=lambda e: e["t"])}


def breakdown(name: str, events: list[dict], steps: int, reused: bool = False) -> Trial:
    """A trial's rows from its recorded events (all its processes'), in ORDER. `reused`: its trial actor ran an
    earlier trial (Tune's reuse_actors), so that actor's process start is not this trial's cost."""
    at = last_times(events)
    if reused:
        at.pop("trial process start", None)
    rows: dict[str, float | None] = {}
    prev: float | None = None
    for phase in ORDER:
        e = at.get(phase)
        if e is None or (phase.endswith("process start") and prev is not None and e["t"] < prev):
            rows[phase] = None
            continue
        rows[phase] = None if prev is None else e["t"] - prev
        prev = e["t"]
    first, last = at.get("first step done"), at.get("last step done")
    per_step = (last["t"] - first["t"]) / (steps - 1) if first and last and steps > 1 else None
    pids = {
        p.split()[0]: at[p]["pid"] for p in ("trial start", "fit entry", "worker_loop entry", "eval entry") if p in at
    }
    return Trial(
        name,
        at["trial start"]["t"],
        at["trial end"]["t"],
        rows,
        per_step,
        None if per_step is None else per_step * steps,
        pids=pids,
    )


def place_in_sweep(trials: list[Trial], driver: list[dict]) -> None:
    """Each trial's `before`: from tuner.fit (driver) or the latest end of a trial that ended before it started."""
    called = last_times(driver).get("tuner.fit called")
    for t in trials:
        ends = [o.end for o in trials if o is not t and o.end <= t.start]
        since = max(ends + ([called["t"]] if called else []), default=None)
        t.before = None if since is None else t.start - since


def most_at_once(trials: list[Trial]) -> int:
    """The most trials that ran at the same time (from their start and end)."""
    edges = sorted([(t.start, 1) for t in trials] + [(t.end, -1) for t in trials])
    now = most = 0
    for _, step in edges:  # an end sorts before a start at the same instant
        now += step
        most = max(most, now)
    return most


def _cell(v: float | None, fmt: str = "{:.2f}") -> str:
    return "-" if v is None else fmt.format(v)


def _median(vals: list[float | None]) -> float | None:
    got = [v for v in vals if v is not None]
    return statistics.median(got) if got else None


def table(trials: list[Trial]) -> list[str]:
    """The per-trial columns and the median, as text lines."""
    width = max(len(p) for p in ORDER) + 2
    cols = [t.name for t in trials] + ["median"]
    cw = max(10, *(len(c) + 2 for c in cols))
    lines = ["seconds".ljust(width) + "".join(c.rjust(cw) for c in cols)]

    def row(label: str, vals: list[float | None], fmt: str = "{:.2f}") -> None:
        lines.append(label.ljust(width) + "".join(_cell(v, fmt).rjust(cw) for v in [*vals, _median(vals)]))

    row("before the trial (Tune)", [t.before for t in trials])
    for phase in ORDER:
        row(phase, [t.rows.get(phase) for t in trials])
    lines.append("-" * (width + cw * len(cols)))
    row("per step", [t.per_step for t in trials], "{:.3f}")
    row("steps (steps x per step)", [t.steps_s for t in trials])
    row("trial wall (end - start)", [t.wall for t in trials])
    row("overhead (wall - steps)", [t.overhead for t in trials])
    return lines


def biggest(trials: list[Trial], n: int = 3) -> list[tuple[str, float]]:
    """The n phases with the largest median seconds, the steps excluded ("last step done" is STEPS-1 of them); the
    Tune gap is not one of them ("trial start" holds most of it)."""
    med = {p: _median([t.rows.get(p) for t in trials]) for p in ORDER if p != "last step done"}
    return sorted(((p, v) for p, v in med.items() if v is not None), key=lambda pv: -pv[1])[:n]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--lesson", type=int, default=2)
    ap.add_argument("--seeds", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--preset", default="laptop")
    ap.add_argument("--workdir", default=None, help="default: a fresh temporary directory")
    ap.add_argument("--out", default=None, help="also write the output here")
    ap.add_argument("--concurrent", type=int, default=None, help="trials side by side (default: as the sweep decides)")
    ap.add_argument("--note", default="", help="a line about the conditions (e.g. what else loads the machine)")
    ap.add_argument("--from-events", default=None, help="print the table of a run's events.json; run nothing")
    ap.add_argument("overrides", nargs="*", default=["eval.every=10"], help="key=value config overrides")
    args = ap.parse_args()
    run = json.loads(Path(args.from_events).read_text()) if args.from_events else measure(args)
    text = "\n".join(report(run)) + "\n"
    print(text, end="")
    if args.out:
        Path(args.out).write_text(text)


def measure(args: argparse.Namespace) -> dict:
    """Run the sweep: its events (the driver's and each trial's) and its conditions, kept in WORKDIR/events.json."""
    from cglab.raylocal import shutdown
    from cglab.track import timeline
    from cglab.track.server import make_server
    from cglab.tune.presets import base_config, get_preset, preset_corpus_sources
    from cglab.tune.sweep import run_lesson
    from lessons_study import commit, machine  # benchmarks/ is the script's directory

    load0, started = os.getloadavg(), time.time()
    work = Path(args.workdir or tempfile.mkdtemp(prefix="cglab-trial-overhead-"))
    pre = get_preset(args.preset)
    sources = preset_corpus_sources(pre)  # as `cglab ablate` with no data.sources: the preset's own corpus
    base = base_config(
        pre, None, [f"data.sources={json.dumps(sources)}", f"train.train_steps={args.steps}", *args.overrides]
    )
    server = make_server(work / "mlflow")
    try:
        server.start()
        t0 = time.time()
        res = run_lesson(
            args.lesson,
            preset=pre,
            base=base,
            seeds=tuple(args.seeds),
            storage_path=str(work / "tune"),
            tracking_uri=server.uri,
            max_concurrent_trials=args.concurrent,
            verbose=0,
        )
        sweep_wall = time.time() - t0
    finally:
        server.stop()
        shutdown()
    if res.errors:
        raise RuntimeError(f"{len(res.errors)} trials failed: {res.errors}")
    run = dict(
        lesson=args.lesson,
        preset=args.preset,
        seeds=args.seeds,
        steps=args.steps,
        overrides=args.overrides,
        commit=commit(),
        started=started,
        machine=f"{machine()}, {os.cpu_count()} cores",
        load_start=load0,
        load_end=os.getloadavg(),
        note=args.note,
        sweep_start=t0,
        sweep_wall=sweep_wall,
        driver=timeline.events(timeline.hand_back()),
        trials={f"{r['variant']}-{r['seed']}": timeline.events(r.get("timeline")) for r in res.results},
    )
    (work / "events.json").write_text(json.dumps(run, indent=1))
    return run


def report(run: dict) -> list[str]:
    """The output lines of a measured run (`measure`'s dict)."""
    steps, t0, wall = run["steps"], run["sweep_start"], run["sweep_wall"]
    trials = sorted((breakdown(n, ev, steps) for n, ev in run["trials"].items()), key=lambda t: t.start)
    seen: set[int] = set()
    for i, t in enumerate(trials):  # a trial actor that ran an earlier trial: reused, not started for this one
        if t.pids.get("trial") in seen:
            trials[i] = breakdown(t.name, run["trials"][t.name], steps, reused=True)
        seen.add(t.pids.get("trial"))
    place_in_sweep(trials, run["driver"])
    at = {p: e["t"] for p, e in last_times(run["driver"]).items()}
    load0, load1 = run["load_start"], run["load_end"]
    before = at["tuner.fit called"] - t0 if "tuner.fit called" in at else None
    after = t0 + wall - at["tuner.fit returned"] if "tuner.fit returned" in at else None
    return [
        f"benchmarks/trial_overhead.py: lesson {run['lesson']} at the {run['preset']} preset, seeds {run['seeds']}, "
        f"{len(trials)} trials x {steps} steps, overrides {run['overrides']}",
        f"at commit {run['commit']}, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime(run['started']))}",
        f"machine: {run['machine']}",
        f"load average at start: {' '.join(f'{x:.2f}' for x in load0)}; at end: {' '.join(f'{x:.2f}' for x in load1)}",
        *([f"note: {run['note']}"] if run["note"] else []),
        "",
        "Each row: seconds from the previous recorded phase to this one ('-': not recorded, or a process Ray had",
        "started beforehand). 'trial start' counts from the trial actor's process start ('-': an actor reused from an",
        "earlier trial), 'before the trial (Tune)'",
        "from tuner.fit or the previous trial's end (the two overlap). 'last step done' holds steps 2..N; 'first",
        "step done' the first step and its warm-up.",
        "",
        *table(trials),
        "",
        f"sweep: run_lesson {wall:.1f} s; before tuner.fit (Ray, tokenizer, held-out split, preflight, parent run) "
        f"{_cell(before, '{:.1f}')} s; after tuner.fit (verdicts, stability) {_cell(after, '{:.1f}')} s; "
        f"trials side by side (most at once): {most_at_once(trials)}",
        "processes (pid): " + "; ".join(f"{t.name} {t.pids}" for t in trials),
        "biggest median phases outside the steps: " + ", ".join(f"{p} {v:.1f} s" for p, v in biggest(trials)),
    ]


if __name__ == "__main__":
    main()
