"""A lesson's verdicts: each contrast it declared (`Lesson.contrasts`) tested on the measured values, with Holm's
correction over the lesson's tests, and nothing else decided.

Per contrast the paired difference a - b over seeds (Welch where the variants share fewer than two seeds) is
turned into the advantage of a (positive: a better, by the metric's goal), and two one-sided p-values:

    test             claim (p)                           against (p_against)
    superiority      a better than b                     b better than a
    non_inferiority  a worse by less than the margin     a worse by more than the margin
    equivalence      |a - b| < margin (TOST: the larger  the difference beyond the margin on one side
                     p of its two one-sided tests)       (the smaller of the two one-sided p-values)

Both are Holm-adjusted over the lesson's measured contrasts. The claim's adjusted p below ALPHA gives `agrees`
(`equivalent` for an equivalence), the other's gives `disagrees`; anything else is `inconclusive`: a failed
equivalence is not a difference, and a failed superiority is not an equivalence. At a single test (k = 1) this
is the interval rule: `equivalent` exactly when the 90% interval of the difference lies within the margin,
`disagrees` when it lies wholly outside it."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping

from cglab.tune.lessons import EQUIVALENCE, NON_INFERIORITY, SUPERIORITY, Contrast, Lesson
from cglab.tune.stats import Estimate, Interval, diff_estimate, holm, mean_ci

AGREES, DISAGREES, EQUIVALENT, INCONCLUSIVE, NOT_MEASURED = (
    "agrees",
    "disagrees",
    "equivalent",
    "inconclusive",
    "not measured",
)
ONE_SEED = "one seed, no verdict"
ALPHA = 0.05  # family-wise, over a lesson's contrasts (Holm)
LEVEL = 1 - 2 * ALPHA  # the interval a one-sided test at ALPHA reads (and TOST's two): 90%


@dataclass(frozen=True)
class ContrastOutcome:
    contrast: Contrast
    verdict: str  # AGREES | DISAGREES | EQUIVALENT | INCONCLUSIVE | NOT_MEASURED
    diff: Estimate | None = None  # mean(a) - mean(b), in the metric's units
    paired: bool = False
    p: float | None = None  # the claim's one-sided p (TOST: the larger of two), before Holm
    p_holm: float | None = None
    p_against: float | None = None
    p_against_holm: float | None = None
    note: str = ""
    intervals: dict[str, Interval] = field(default_factory=dict)  # a and b: mean and 95% interval over seeds

    @property
    def metric(self) -> str:
        return self.contrast.metric

    @property
    def interval(self) -> Interval | None:
        """The LEVEL (90%) interval of a - b: the one the tests read."""
        return None if self.diff is None else self.diff.interval(LEVEL)

    @property
    def agrees(self) -> bool | None:
        """True / False for a verdict, None when there is none (inconclusive, not measured)."""
        return {AGREES: True, EQUIVALENT: True, DISAGREES: False}.get(self.verdict)


Samples = Mapping[str, Mapping[str, "float | Mapping[Any, float]"]]


def _per_seed(x) -> dict[Any, float]:
    vals = dict(x) if isinstance(x, Mapping) else {None: x}  # a bare number is one seed's value
    return {s: float(v) for s, v in vals.items() if v is not None and v == v}  # NaN: not measured


def p_values(c: Contrast, goal: str, diff: Estimate) -> tuple[float | None, float | None]:
    """(p of the claim, p of its contrary) for a - b = diff on a metric whose goal is `goal`."""
    adv = diff.scaled(-1.0 if goal == "min" else 1.0)  # > 0: a better than b
    m = c.margin
    if c.test == SUPERIORITY:
        return adv.p_above(0.0), adv.p_below(0.0)
    if c.test == NON_INFERIORITY:
        return adv.p_above(-m), adv.p_below(-m)
    if c.test == EQUIVALENCE:
        lower, upper = adv.p_above(-m), adv.p_below(m)
        if lower is None:
            return None, None
        return max(lower, upper), min(adv.p_below(-m), adv.p_above(m))
    raise ValueError(f"contrast {c.name!r}: unknown test {c.test!r}")


def _measure(lesson: Lesson, c: Contrast, samples: Samples) -> ContrastOutcome:
    seeds = {v: _per_seed(samples.get(v, {}).get(c.metric, {})) for v in (c.a, c.b)}
    missing = [v for v, s in seeds.items() if not s]
    if missing:
        return ContrastOutcome(c, NOT_MEASURED, note=f"no {c.metric} for {', '.join(missing)}")
    ivs = {v: mean_ci(list(s.values())) for v, s in seeds.items()}
    diff, paired = diff_estimate(seeds[c.a], seeds[c.b])
    if diff.se is None:
        return ContrastOutcome(c, INCONCLUSIVE, diff, paired, note=ONE_SEED, intervals=ivs)
    p, against = p_values(c, lesson.metric(c.metric).goal, diff)
    return ContrastOutcome(c, INCONCLUSIVE, diff, paired, p, None, against, None, "", ivs)


def _decide(o: ContrastOutcome, p_holm: float | None, against_holm: float | None) -> ContrastOutcome:
    if o.p is None:
        return o
    if p_holm < ALPHA:
        word, note = (EQUIVALENT if o.contrast.test == EQUIVALENCE else AGREES), ""
    elif against_holm < ALPHA:
        word, note = DISAGREES, ""
    elif o.p < ALPHA:
        word, note = INCONCLUSIVE, f"raw p {o.p:.3g} passes {ALPHA:g}, Holm-adjusted {p_holm:.3g} does not"
    else:
        word, note = INCONCLUSIVE, f"p {p_holm:.3g} (Holm) >= {ALPHA:g} either way"
    return ContrastOutcome(
        o.contrast, word, o.diff, o.paired, o.p, p_holm, o.p_against, against_holm, note, o.intervals
    )


def verdict(
    lesson: Lesson, samples: Samples, contrasts: Iterable[Contrast | str] | None = None
) -> list[ContrastOutcome]:
    """samples: variant -> {metric: {seed: value}} (a bare number counts as one seed). The outcome of each of
    `contrasts` (default: all the lesson declared), in that order. A contrast the lesson did not declare is a
    ConfigError naming it: the Holm family and the claims are fixed before the runs, never picked after them.
    The family is always all of the lesson's measured contrasts, whichever are asked for."""
    chosen = list(lesson.contrasts) if contrasts is None else [lesson.contrast(c) for c in contrasts]
    measured = [_measure(lesson, c, samples) for c in lesson.contrasts]
    adj, adj_against = holm([o.p for o in measured]), holm([o.p_against for o in measured])
    decided = {o.contrast: _decide(o, a, b) for o, a, b in zip(measured, adj, adj_against)}
    return [decided[c] for c in chosen]
