"""Decision stability: from the held-out metric's curve of every trial of a lesson, from which point on the
ranking of the variants (and the verdict) no longer changed, and whether a run 4x shorter would have reached
the same verdict. It is what sizes a lesson before paying for it.

Pure: histories in, numbers out (the report reads the histories from MLflow and draws them). The runs of one
lesson share the evaluation schedule (every `eval.every` steps, then the final evaluation), so the points are
aligned on the fraction of the run they stand at, tokens seen / the run's final tokens: for the equal-compute
lessons that is tokens seen itself, and for lesson 5 (its variants train different budgets) it compares each
variant at the same share of its own budget, which is what "a run 4x shorter" means there. The verdicts at each
point are the final report's (`verdicts.verdict`: every declared contrast, Holm over all of them) on the values
of every metric at that point; a metric's stability follows its own contrasts' verdicts and its ranking."""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Mapping, Sequence

import numpy as np

from cglab.tune.lessons import Lesson, Metric
from cglab.tune.stats import t975
from cglab.tune.verdicts import INCONCLUSIVE, NOT_MEASURED, ContrastOutcome, verdict

SAME, DIFFERENT = "same", "different"  # the 4x-shorter answers, besides NOT_MEASURED
QUARTER = 0.25
# Fractions of a run are kept as integer billionths, so that equal fractions from different runs meet exactly
# (they are ratios of integers; this only absorbs float noise in logged token counts).
_SCALE = 1_000_000_000

Point = tuple[float, float]  # (tokens seen, value)
Histories = Mapping[str, Mapping[str, Sequence[Point]]]  # variant -> seed -> points


@dataclass(frozen=True)
class Curves:
    """One metric's curves of a lesson's variants on the points they share. Shapes: V variants, S seeds
    (the union over variants; a variant without a seed has NaN there), P points."""

    metric: str
    variants: tuple[str, ...]
    seeds: tuple[str, ...]
    fraction: np.ndarray  # (P,) point as a fraction of the run, increasing, the last is 1 (the final evaluation)
    tokens: np.ndarray  # (V, P) tokens seen by the variant at the point
    values: np.ndarray  # (V, S, P) NaN where the run has no value at the point
    n: np.ndarray  # (V, P) seeds measured
    mean: np.ndarray  # (V, P) mean over seeds, NaN where none
    lo: np.ndarray  # (V, P) 95% t-interval of the mean, NaN below two seeds
    hi: np.ndarray

    def samples(self, p: int) -> dict[str, dict[str, dict[str, float]]]:
        """The values at point p the way `verdicts.verdict` takes them: variant -> {metric: {seed: value}}."""
        out = {}
        for i, v in enumerate(self.variants):
            col = self.values[i, :, p]
            seeds = {s: float(x) for s, x in zip(self.seeds, col) if not np.isnan(x)}
            if seeds:
                out[v] = {self.metric: seeds}
        return out


@dataclass(frozen=True)
class Stability:
    metric: str
    curves: Curves | None  # None: no variant has more than one point (only the final evaluation was logged)
    rankings: tuple[tuple[str, ...], ...] = ()  # per point: measured variants, best first
    outcomes: tuple[tuple[ContrastOutcome, ...], ...] = ()  # per point: this metric's contrasts decided there
    stable_from: int | None = None  # index of the first point from which ranking and verdicts stay the final ones
    quarter: str = NOT_MEASURED  # SAME | DIFFERENT | NOT_MEASURED
    quarter_point: int | None = None  # the point the 4x-shorter answer read
    note: str = ""

    @property
    def final(self) -> tuple[ContrastOutcome, ...] | None:
        return self.outcomes[-1] if self.outcomes else None

    @property
    def stable_from_fraction(self) -> float | None:
        return None if self.stable_from is None else float(self.curves.fraction[self.stable_from])

    @property
    def stable_from_tokens(self) -> float | None:
        """Tokens seen at the stable point; with unequal budgets (lesson 5), those of the longest variant."""
        return None if self.stable_from is None else float(np.nanmax(self.curves.tokens[:, self.stable_from]))

    @property
    def final_tokens(self) -> float | None:
        return None if self.curves is None else float(np.nanmax(self.curves.tokens[:, -1]))


def align(metric: str, histories: Histories, variants: Sequence[str] | None = None) -> Curves | None:
    """Per variant the mean and 95% band over seeds at the points the runs share (see the module doc). A run
    missing a point leaves a NaN there (fewer seeds at that point). None when no run has a point."""
    order = [v for v in (variants or histories) if histories.get(v)]
    runs = [(v, s, sorted(pts)) for v in order for s, pts in histories[v].items() if pts]
    if not runs:
        return None
    seeds = tuple(dict.fromkeys(s for _, s, _ in runs))
    # A run's points as fractions of its own final tokens (its last point: the final evaluation).
    fracs = {
        (v, s): np.round(np.array([t for t, _ in pts]) * _SCALE / max(pts[-1][0], 1e-12)).astype(np.int64)
        for v, s, pts in runs
    }
    grid = np.unique(np.concatenate(list(fracs.values())))
    vi, si = {v: i for i, v in enumerate(order)}, {s: i for i, s in enumerate(seeds)}
    values = np.full((len(order), len(seeds), len(grid)), np.nan)
    final = np.full(len(order), np.nan)
    for v, s, pts in runs:
        idx = np.searchsorted(grid, fracs[v, s])
        values[vi[v], si[s], idx] = [x for _, x in pts]
        final[vi[v]] = np.fmax(final[vi[v]], pts[-1][0])
    n = np.sum(~np.isnan(values), axis=1)
    with warnings.catch_warnings():  # all-NaN columns (no seed at a point) are meant to give NaN
        warnings.simplefilter("ignore", RuntimeWarning)
        mean = np.nanmean(values, axis=1)
        sd = np.nanstd(values, axis=1, ddof=1)
    t = np.array([np.inf, *(t975(k) for k in range(1, len(seeds) + 1))])[np.maximum(n - 1, 0)]
    half = np.where(n >= 2, t * sd / np.sqrt(np.maximum(n, 1)), np.nan)
    fraction = grid / _SCALE
    tokens = final[:, None] * fraction[None, :]
    return Curves(metric, tuple(order), seeds, fraction, tokens, values, n, mean, mean - half, mean + half)


def rankings(curves: Curves, goal: str) -> list[tuple[str, ...]]:
    """Per point, the measured variants best first (ties: lesson order)."""
    key = np.where(np.isnan(curves.mean), np.inf, curves.mean if goal == "min" else -curves.mean)
    order = np.argsort(key, axis=0, kind="stable")  # (V, P)
    measured = np.take_along_axis(~np.isnan(curves.mean), order, axis=0)
    return [tuple(curves.variants[i] for i, m in zip(order[:, p], measured[:, p]) if m) for p in range(key.shape[1])]


def stable_from(decisions: Sequence) -> int | None:
    """The first index from which every decision equals the last one."""
    if not decisions:
        return None
    same = np.array([d == decisions[-1] for d in decisions])
    changed = np.flatnonzero(~same)
    return int(changed[-1] + 1) if changed.size else 0


def _decision(ranking: tuple[str, ...], outcomes: tuple[ContrastOutcome, ...]) -> tuple:
    # What a reader acts on: each contrast's verdict and the variant leading the metric.
    return tuple((o.contrast.name, o.verdict) for o in outcomes), ranking[0] if ranking else None


def _grid(c: Curves) -> np.ndarray:
    return np.round(c.fraction * _SCALE).astype(np.int64)


def _samples_at(lesson: Lesson, curves: Curves, others: Mapping[str, Histories]) -> list[dict]:
    """Per point of `curves`, the values of every metric of the lesson's contrasts at the same fraction of the run
    (the evaluations log all metrics at once), so each point's verdict is the lesson's whole family's."""
    keys = {c.metric for c in lesson.contrasts} - {curves.metric}
    names = [v.name for v in lesson.variants]
    extra = [c for c in (align(k, others.get(k, {}), [v for v in names if v in others.get(k, {})]) for k in keys) if c]
    out = []
    for p, f in enumerate(_grid(curves)):
        samples = curves.samples(p)
        for c in extra:
            hit = np.flatnonzero(_grid(c) == f)
            for v, ms in (c.samples(int(hit[0])) if hit.size else {}).items():
                samples.setdefault(v, {}).update(ms)
        out.append(samples)
    return out


def stability(
    lesson: Lesson, metric: Metric, histories: Histories, others: Mapping[str, Histories] | None = None
) -> Stability:
    """metric's curves over the lesson's runs, the ranking and the verdicts of its contrasts at each point, the
    point from which both stay the final ones, and what a run 4x shorter would have said (the last point at or
    below a quarter of the run) compared with the final one. others: metric -> histories of the lesson's other
    metrics, for the Holm family at each point (without them, only this metric's contrasts are measured)."""
    curves = align(metric.key, histories, [v.name for v in lesson.variants if v.name in histories])
    if curves is None:
        return Stability(metric.key, None, note="not measured")
    if len(curves.fraction) < 2:
        return Stability(metric.key, None, note="one evaluation per run (the final one): no curve")
    outcomes = tuple(
        tuple(o for o in verdict(lesson, samples) if o.metric == metric.key)
        for samples in _samples_at(lesson, curves, others or {})
    )
    ranks = tuple(rankings(curves, metric.goal))
    decisions = [_decision(r, o) for r, o in zip(ranks, outcomes)]
    start = stable_from([(r, d) for r, d in zip(ranks, decisions)])
    early = np.flatnonzero(curves.fraction <= QUARTER)
    q = int(early[-1]) if early.size else None
    if q is None or not ranks[q]:
        quarter, note = NOT_MEASURED, "no evaluation at or before a quarter of the run"
    else:
        quarter = SAME if decisions[q] == decisions[-1] else DIFFERENT
        undecided = all(o.verdict in (INCONCLUSIVE, NOT_MEASURED) for o in outcomes[-1])
        note = (
            "no verdict at the end: 'same' says the shorter run had none either"
            if quarter == SAME and outcomes[-1] and undecided
            else ""
        )
    return Stability(metric.key, curves, ranks, outcomes, start, quarter, q, note)
