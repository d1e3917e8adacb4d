"""Seeds by power: how many seeds a lesson's declared contrast needs, from a pilot's paired differences.

Per contrast the pilot gives d_s = a_s - b_s for every seed s both variants ran (the design the verdicts read:
a seed fixes data order and initialisation for both). With SD s of those differences, n seeds give a t-interval
of the mean difference of half-width

    h(n) = t((1 + level) / 2, n - 1) * s / sqrt(n)

and the seeds needed are the least n >= 2 with h(n) <= margin / 2: then a true difference within half the margin
of zero (or of the other side's bound) still leaves the interval on the right side of the margin, whichever of
superiority, non-inferiority or equivalence the contrast tests.

What it assumes: the differences are independent across seeds and close to normal, and the pilot's SD is the
true one. It is an estimate from few seeds (its chi-square error with n-1 df is large at 2-3 seeds), so the
number is where the half-width is expected to land, not a guarantee; about half of the runs of that size will
have a larger SD. The level is the one the verdict must clear (`family_level`), not a lower one."""

from __future__ import annotations

import math
from dataclasses import dataclass
from statistics import NormalDist, stdev
from typing import Any, Mapping, Sequence

from cglab.config import ConfigError
from cglab.tune.lessons import Contrast, Lesson
from cglab.tune.stats import t_quantile
from cglab.tune.verdicts import ALPHA

# Past this many seeds the answer is "shrink the noise or widen the margin", not a number anyone runs; it also
# bounds the search (t_quantile costs O(df)).
MAX_SEEDS = 10_000
PILOT_FLAG = "--pilot"


@dataclass(frozen=True)
class SeedsNeeded:
    pilot_seeds: int  # paired differences the pilot gave
    sd: float | None  # their SD (n-1 denominator); None below two
    margin: float
    level: float  # two-sided confidence of the interval whose half-width is sized
    seeds: int | None  # None: unknown (see note)
    note: str = ""


def half_width(sd: float, n: int, level: float) -> float:
    """Half-width of the two-sided `level` t-interval of a mean of n values with SD sd."""
    return t_quantile((1 + level) / 2, n - 1) * sd / math.sqrt(n)


def _check(margin: float, level: float) -> None:
    if not margin > 0:
        raise ValueError(f"margin must be > 0 (in the metric's units), got {margin!r}")
    if not 0 < level < 1:
        raise ValueError(f"level must be in (0, 1), got {level!r}")


def seeds_for_sd(sd: float, margin: float, level: float) -> int | None:
    """The least n >= 2 with half_width(sd, n, level) <= margin / 2; None beyond MAX_SEEDS."""
    _check(margin, level)
    if not (sd >= 0 and math.isfinite(sd)):
        raise ValueError(f"sd must be finite and >= 0, got {sd!r}")
    target = margin / 2
    # t(n-1) > z for every n, so no n below the normal-theory answer can do: start there and walk up.
    z = NormalDist().inv_cdf((1 + level) / 2)
    n = max(2, math.ceil((z * sd / target) ** 2))
    while n <= MAX_SEEDS:
        if half_width(sd, n, level) <= target:
            return n
        n += 1
    return None


def seeds_needed(diffs: Sequence[float], margin: float, level: float) -> SeedsNeeded:
    """From a pilot's paired differences of one contrast (per seed: a - b): the seeds its `level` interval needs
    for a half-width of at most margin / 2. Fewer than two differences: unknown (no spread to measure)."""
    _check(margin, level)
    xs = [float(d) for d in diffs]
    if any(not math.isfinite(x) for x in xs):
        raise ValueError(f"paired differences must be finite, got {xs}")
    if len(xs) < 2:
        note = f"the pilot has {len(xs)} paired seed(s); an SD needs at least 2"
        return SeedsNeeded(len(xs), None, margin, level, None, note)
    sd = stdev(xs)
    n = seeds_for_sd(sd, margin, level)
    if n is None:
        return SeedsNeeded(len(xs), sd, margin, level, None, f"more than {MAX_SEEDS}: widen the margin or cut noise")
    note = "the pilot's differences have no spread: 2 is the fewest with an interval" if sd == 0 else ""
    return SeedsNeeded(len(xs), sd, margin, level, n, note)


def family_level(lesson: Lesson) -> float:
    """The interval a contrast must clear whatever the others measure: Holm's first step tests at ALPHA / k over
    the lesson's k declared contrasts, a one-sided test at that size reads a two-sided 1 - 2 ALPHA / k interval
    (k = 1: the verdicts' 90%)."""
    return 1 - 2 * ALPHA / max(1, len(lesson.contrasts))


def paired_diffs(samples: Mapping[str, Mapping[str, Mapping[Any, float]]], c: Contrast) -> list[float]:
    """a - b on the contrast's metric for every seed both variants measured (NaN and None: not measured).
    samples: variant -> metric -> seed -> value, as cglab.tune.results.LessonRuns.samples."""
    a, b = (
        {s: x for s, x in samples.get(v, {}).get(c.metric, {}).items() if x is not None and x == x} for v in (c.a, c.b)
    )
    return [float(a[s]) - float(b[s]) for s in a if s in b]


def plan_seeds(lesson: Lesson, samples: Mapping | None, planned: int | None = None) -> dict:
    """`cglab plan --lesson`'s seeds section: per declared contrast the pilot's seeds, SD of the paired
    differences, margin and seeds needed (unknown without a pilot), and the most any contrast needs."""
    level = family_level(lesson)
    rows = []
    for c in lesson.contrasts:
        row = dict(contrast=c.name, test=c.test, pilot_seeds=None, sd=None, margin=c.margin, seeds_needed="unknown")
        if samples is None:
            row["note"] = f"until a pilot exists: {PILOT_FLAG} SOURCE"
        else:
            r = seeds_needed(paired_diffs(samples, c), c.margin, level)
            row.update(pilot_seeds=r.pilot_seeds, sd=None if r.sd is None else round(r.sd, 6))
            if r.seeds is not None:
                row["seeds_needed"] = r.seeds
            if r.note:
                row["note"] = r.note
        rows.append(row)
    known = [r["seeds_needed"] for r in rows if isinstance(r["seeds_needed"], int)]
    out = {
        "level": round(level, 6),
        "family": len(lesson.contrasts),
        "target": "half-width of the paired t-interval <= margin / 2",
        "contrasts": rows,
        "most": max(known) if known else "unknown",
    }
    if planned is not None:
        out["planned"] = planned
    return out


def pilot_samples(data: Any, lesson: int, where: str = "pilot") -> dict:
    """A lesson's per-seed samples (variant -> metric -> seed -> value) from a results JSON: either those samples
    themselves or {"lessons": {"N": samples, ...}} (benchmarks/lessons_study.py writes the latter beside its
    Markdown). A ConfigError naming `where` for anything else."""
    if isinstance(data, Mapping) and "lessons" in data:
        lessons = data["lessons"]
        if not isinstance(lessons, Mapping) or str(lesson) not in lessons:
            have = sorted(lessons) if isinstance(lessons, Mapping) else lessons
            raise ConfigError(f"{where}: no lesson {lesson} under 'lessons' (it has {have})")
        data = lessons[str(lesson)]
    shape = "variant -> metric -> seed -> value"
    if not isinstance(data, Mapping) or not all(
        isinstance(ms, Mapping) and all(isinstance(xs, Mapping) for xs in ms.values()) for ms in data.values()
    ):
        raise ConfigError(f"{where}: expected {shape} (or {{'lessons': {{'N': ...}}}})")
    try:
        return {
            v: {k: {s: float(x) for s, x in xs.items() if x is not None} for k, xs in ms.items()}
            for v, ms in data.items()
        }
    except (TypeError, ValueError) as err:
        raise ConfigError(f"{where}: a value is not a number ({err}); expected {shape}") from None
