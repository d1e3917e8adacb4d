"""The five CodeGen2 lessons as experiment definitions: variants are config overrides on one base config.

Each `Lesson` says what it varies, what it holds fixed, which metrics decide it and what the paper found
(Nijkamp et al., 2023, "CodeGen2: Lessons for Training LLMs on Programming and Natural Languages").
Unless the lesson is about compute (lesson 5), every variant of a lesson trains the same number of steps at
the same global batch and sequence length, so compute (and tokens seen) is equal across variants.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Literal, Mapping, Sequence

from cglab.config import CGLabConfig, ConfigError, from_dict

# Final metrics the training/eval step reports (see cglab.train.trainer.fit); lower ppl is better.
CODE_PPL = "eval/code_ppl"  # left-to-right perplexity on held-out code
NL_PPL = "eval/nl_ppl"  # left-to-right perplexity on held-out natural language
INFILL_PPL = "eval/infill_ppl"  # perplexity of the middle, prompted prefix <mask_1> suffix <eot> <sep> <mask_1>
PASS_AT_1 = "eval/humaneval_pass_at_1"  # not "pass@1": MLflow rejects "@" in metric names (the whole batch)
LOSS = "loss"


@dataclass(frozen=True)
class Metric:
    key: str
    goal: Literal["min", "max"]
    # Variants the paper expects to come out best on this metric. Empty: the metric is descriptive (reported
    # with its intervals, never a verdict) - a claim every variant satisfies could not disagree, so it decides
    # nothing.
    paper_best: tuple[str, ...] = ()

    @property
    def decides(self) -> bool:
        return bool(self.paper_best)


@dataclass(frozen=True)
class Variant:
    name: str
    overrides: tuple[str, ...]  # dotted key=value, same syntax as `cglab train CONFIG key=value`
    steps_multiplier: int = 1  # lesson 5 only: more passes over the same unique tokens cost more steps


@dataclass(frozen=True)
class Lesson:
    number: int
    slug: str
    question: str
    variants: tuple[Variant, ...]
    fixed: tuple[str, ...]  # config fields every variant shares (besides everything not overridden)
    metrics: tuple[Metric, ...]
    finding: str  # the paper's finding, one sentence
    equal_compute: bool = True

    @property
    def experiment(self) -> str:
        return f"codegen2/lesson-{self.number}-{self.slug}"

    def variant(self, name: str) -> Variant:
        for v in self.variants:
            if v.name == name:
                return v
        raise KeyError(f"lesson {self.number} has no variant {name!r}; choose one of {[v.name for v in self.variants]}")

    def config_for(
        self, variant: str, base: CGLabConfig, seed: int | None = None, cross_field: bool = True
    ) -> CGLabConfig:
        """The base config with the variant's overrides (and seed) applied, validated (cross-field constraints
        too unless cross_field=False)."""
        v = self.variant(variant)
        overrides = list(v.overrides)
        if v.steps_multiplier != 1:
            overrides.append(f"train.train_steps={base.train.train_steps * v.steps_multiplier}")
        if seed is not None:
            overrides += [f"train.seed={seed}", f"data.seed={seed}"]
        try:
            return from_dict(base.model_dump(mode="json"), overrides, cross_field)
        except ConfigError as err:
            raise ConfigError(f"lesson {self.number} variant {variant!r}: {err}") from None

    def configs(
        self, base: CGLabConfig, seeds: tuple[int, ...] | None = None
    ) -> dict[tuple[str, int | None], CGLabConfig]:
        """Every (variant, seed) config, validated up front so a bad one fails before any trial starts."""
        return {(v.name, s): self.config_for(v.name, base, s) for v in self.variants for s in (seeds or (None,))}


_FIXED_COMPUTE = ("train.train_steps", "train.global_batch_size", "data.seq_length", "model.*", "train.lr")


def build_lessons(infill_rate: float = 0.5) -> dict[int, Lesson]:
    objectives = {
        "codegen2": ("objective.kind=codegen2", "objective.causal_prob=0.5"),
        "ul2": ("objective.kind=ul2",),
    }
    lesson1 = Lesson(
        1,
        "prefix-lm",
        "Does a prefix-LM beat a causal decoder?",
        variants=tuple(
            Variant(f"{arch}-{obj}", (f"model.architecture={arch}", *objectives[obj]))
            for arch in ("causal", "prefix_lm")
            for obj in ("codegen2", "ul2")
        ),
        fixed=_FIXED_COMPUTE + ("data.mixture", "objective.corruption"),
        metrics=(
            Metric(CODE_PPL, "min", ("causal-codegen2", "causal-ul2")),
            Metric(PASS_AT_1, "max", ("causal-codegen2", "causal-ul2")),
            # The paper finds no consistent difference on infill: every variant would be "its best", a
            # verdict that could never disagree. Reported, not decided.
            Metric(INFILL_PPL, "min"),
        ),
        finding="The prefix-LM gave no consistent gain over a causal decoder on left-to-right code "
        "generation or infill, so the simpler causal decoder is kept.",
    )
    lesson2 = Lesson(
        2,
        "infill",
        "Is infill a free lunch?",
        variants=(
            Variant("clm", ("objective.kind=clm",)),
            Variant(f"infill-r{infill_rate:g}", ("objective.kind=infill", f"objective.infill_rate={infill_rate}")),
        ),
        fixed=_FIXED_COMPUTE + ("data.mixture", "model.architecture"),
        metrics=(
            Metric(CODE_PPL, "min", ("clm",)),
            Metric(PASS_AT_1, "max", ("clm",)),
            Metric(INFILL_PPL, "min", (f"infill-r{infill_rate:g}",)),
        ),
        finding="Infill training is not a free lunch: at equal compute it costs some left-to-right "
        "quality compared with pure causal LM, in exchange for the infill ability.",
    )
    lesson3 = Lesson(
        3,
        "objective",
        "Simple but carefully chosen objective",
        # CLM corrupts nothing, so file- vs sequence-level corruption would give two identical runs.
        variants=(Variant("clm", ("objective.kind=clm",)),)
        + tuple(
            Variant(f"{name}-{corr}", (*ovr, f"objective.corruption={corr}"))
            for name, ovr in (
                ("span_corruption", ("objective.kind=span_corruption",)),
                ("codegen2", objectives["codegen2"]),
            )
            for corr in ("file_level", "sequence_level")
        ),
        fixed=_FIXED_COMPUTE + ("data.mixture", "model.architecture", "objective.mask_ratio_*"),
        metrics=(
            Metric(CODE_PPL, "min", ("clm", "codegen2-file_level")),
            Metric(PASS_AT_1, "max", ("clm", "codegen2-file_level")),
            Metric(INFILL_PPL, "min", ("codegen2-file_level", "span_corruption-file_level")),
        ),
        finding="Mixing causal LM (p=0.5) with file-level span corruption keeps left-to-right quality "
        "competitive with pure causal LM while adding infill; file-level beats sequence-level.",
    )
    lesson4 = Lesson(
        4,
        "nl-pl-mix",
        "Mixing natural and programming language",
        variants=tuple(Variant(m, (f"data.mixture={m}",)) for m in ("pl_only", "nl_only", "mix")),
        fixed=_FIXED_COMPUTE + ("objective.kind", "model.architecture"),
        metrics=(
            Metric(CODE_PPL, "min", ("pl_only",)),
            Metric(NL_PPL, "min", ("nl_only",)),
            Metric(PASS_AT_1, "max", ("pl_only",)),
        ),
        finding="At equal compute a 50/50 NL+PL mixture is competitive on both domains but does not beat "
        "the domain-specific model on its own domain.",
    )
    lesson5 = Lesson(
        5,
        "multi-epoch",
        "Multi-epoch training",
        variants=tuple(Variant(f"epochs-{e}", (f"train.epochs={e}",), steps_multiplier=e) for e in (1, 2, 5)),
        # Unique tokens = base train_steps x global batch x seq; LR decays over all epochs' steps.
        fixed=(
            "data.sources",
            "data.mixture",
            "train.global_batch_size",
            "data.seq_length",
            "model.*",
            "objective.kind",
            "train.lr (decay horizon = train.train_steps of the variant)",
        ),
        metrics=(Metric(CODE_PPL, "min", ("epochs-5",)), Metric(PASS_AT_1, "max", ("epochs-5",))),
        finding="Several epochs over the same data, with span corruption re-sampled each epoch and the LR "
        "decayed over the whole budget, keep improving the model (CodeGen2.5 trains 5 epochs).",
        equal_compute=False,
    )
    return {les.number: les for les in (lesson1, lesson2, lesson3, lesson4, lesson5)}


LESSONS: dict[int, Lesson] = build_lessons()


def get_lesson(number: int | str, **options) -> Lesson:
    lessons = build_lessons(**options) if options else LESSONS
    try:
        return lessons[int(number)]
    except (KeyError, ValueError):
        raise ConfigError(f"lesson {number!r}: choose one of {sorted(lessons)}") from None


# ------------------------------------------------------------------------------------------ verdicts
# What a verdict can say. `inconclusive` covers both "the interval of the difference covers zero" and "fewer than
# two seeds" (note ONE_SEED), so a one-seed run never reads as evidence; `descriptive` is no verdict at all (a
# metric the paper's finding does not rank variants on).
AGREES, DISAGREES, INCONCLUSIVE, NOT_MEASURED, DESCRIPTIVE = (
    "agrees",
    "disagrees",
    "inconclusive",
    "not measured",
    "descriptive",
)
ONE_SEED = "one seed, no verdict"

# Two-sided 95% Student-t quantiles t(0.975, df) for df = 1..30 (scipy.stats.t.ppf; the table keeps scipy,
# which only arrives with mlflow's extras, out of the dependencies).
_T975 = (
    12.7062,
    4.3027,
    3.1824,
    2.7764,
    2.5706,
    2.4469,
    2.3646,
    2.306,
    2.2622,
    2.2281,
    2.201,
    2.1788,
    2.1604,
    2.1448,
    2.1314,
    2.1199,
    2.1098,
    2.1009,
    2.093,
    2.086,
    2.0796,
    2.0739,
    2.0687,
    2.0639,
    2.0595,
    2.0555,
    2.0518,
    2.0484,
    2.0452,
    2.0423,
)


def t975(df: float) -> float:
    """t(0.975, df). A fractional df (Welch) is rounded down: a slightly wider, conservative interval."""
    d = int(math.floor(df))
    if d < 1:
        return math.inf
    if d <= len(_T975):
        return _T975[d - 1]
    z = 1.959964  # Cornish-Fisher expansion around the normal quantile: within 1e-4 of t for df > 30
    return z + (z**3 + z) / (4 * d) + (5 * z**5 + 16 * z**3 + 3 * z) / (96 * d * d)


@dataclass(frozen=True)
class Interval:
    """A mean over n values with its 95% t-interval; lo/hi are None below two values (no spread to measure)."""

    mean: float
    lo: float | None
    hi: float | None
    n: int

    @property
    def half(self) -> float | None:
        return None if self.lo is None else (self.hi - self.lo) / 2

    def covers_zero(self) -> bool:
        return self.lo is not None and self.lo <= 0.0 <= self.hi


def mean_ci(xs: Sequence[float]) -> Interval:
    n = len(xs)
    m = sum(xs) / n
    if n < 2:
        return Interval(m, None, None, n)
    sd = math.sqrt(sum((x - m) ** 2 for x in xs) / (n - 1))
    h = t975(n - 1) * sd / math.sqrt(n)
    return Interval(m, m - h, m + h, n)


def diff_ci(a: Mapping[Any, float], b: Mapping[Any, float]) -> tuple[Interval, bool]:
    """(interval of mean(a) - mean(b), paired). a, b: seed -> value. Paired over the seeds both have when they
    share at least two: a seed fixes the data order and the initialisation, so the per-seed difference removes
    the noise both variants share. Otherwise Welch's unpaired interval."""
    common = [s for s in a if s in b]
    if len(common) >= 2:
        return mean_ci([a[s] - b[s] for s in common]), True
    xa, xb = list(a.values()), list(b.values())
    ia, ib = mean_ci(xa), mean_ci(xb)
    d = ia.mean - ib.mean
    if ia.lo is None or ib.lo is None:
        return Interval(d, None, None, min(ia.n, ib.n)), False
    va = sum((x - ia.mean) ** 2 for x in xa) / (len(xa) - 1) / len(xa)
    vb = sum((x - ib.mean) ** 2 for x in xb) / (len(xb) - 1) / len(xb)
    if va + vb == 0.0:  # no spread on either side: the difference is exact
        return Interval(d, d, d, min(ia.n, ib.n)), False
    df = (va + vb) ** 2 / (va**2 / (len(xa) - 1) + vb**2 / (len(xb) - 1))
    h = t975(df) * math.sqrt(va + vb)
    return Interval(d, d - h, d + h, min(ia.n, ib.n)), False


@dataclass(frozen=True)
class Outcome:
    metric: str
    verdict: str  # AGREES | DISAGREES | INCONCLUSIVE | NOT_MEASURED | DESCRIPTIVE
    paper_best: tuple[str, ...]
    winner: str | None = None  # best mean
    runner_up: str | None = None  # what the winner is compared with (see `verdict`)
    diff: Interval | None = None  # winner - runner_up, in the metric's units
    paired: bool = False
    note: str = ""
    intervals: dict[str, Interval] = field(default_factory=dict)  # variant -> mean and 95% interval over seeds

    @property
    def agrees(self) -> bool | None:
        """True / False for a verdict, None when there is none (inconclusive, not measured, descriptive)."""
        return {AGREES: True, DISAGREES: False}.get(self.verdict)

    @property
    def values(self) -> dict[str, float]:
        return {v: iv.mean for v, iv in self.intervals.items()}

    @property
    def margin_rel(self) -> float | None:
        if self.diff is None or self.runner_up is None or not self.intervals[self.runner_up].mean:
            return None
        return abs(self.diff.mean) / abs(self.intervals[self.runner_up].mean)


Samples = Mapping[str, Mapping[str, "float | Mapping[Any, float]"]]


def _per_seed(x) -> dict[Any, float]:
    vals = dict(x) if isinstance(x, Mapping) else {None: x}  # a bare number is one seed's value
    return {s: float(v) for s, v in vals.items() if v is not None and v == v}  # NaN: not measured


def verdict(lesson: Lesson, samples: Samples) -> list[Outcome]:
    """samples: variant -> {metric: {seed: value}} (a bare number counts as one seed). Per metric: each variant's
    mean and 95% interval over seeds, and the verdict against the paper.

    The comparison that decides is between the leading variant on each side of the paper's claim: the best
    variant (by mean) against the best one on the other side (the best non-`paper_best` variant when the winner
    is one of `paper_best`, else the best `paper_best` one). When the two leading variants lie on different
    sides, that is the two leading variants; when both are among `paper_best` (lesson 3's clm and
    codegen2-file_level), their difference says nothing about the paper. The difference's interval excluding
    zero gives `agrees` (winner among paper_best) or `disagrees`; covering zero (identical values included, e.g.
    pass@1 = 0 everywhere) or fewer than two seeds on either side gives `inconclusive`."""
    out = []
    for m in lesson.metrics:
        seeds = {v: _per_seed(r[m.key]) for v, r in samples.items() if m.key in r}
        seeds = {v: s for v, s in seeds.items() if s}
        if not seeds:
            out.append(Outcome(m.key, NOT_MEASURED, m.paper_best))
            continue
        ivs = {v: mean_ci(list(s.values())) for v, s in seeds.items()}
        order = sorted(ivs, key=lambda v: ivs[v].mean, reverse=m.goal == "max")
        win = order[0]
        if not m.decides:
            rival = order[1] if len(order) > 1 else None
        else:
            rival = next((v for v in order[1:] if (v in m.paper_best) != (win in m.paper_best)), None)
        if rival is None:
            note = (
                "descriptive: the paper's finding does not rank the variants on it"
                if not m.decides
                else f"no variant on the other side of the paper's claim measured (only {', '.join(order)})"
            )
            out.append(
                Outcome(
                    m.key,
                    DESCRIPTIVE if not m.decides else INCONCLUSIVE,
                    m.paper_best,
                    win,
                    None,
                    None,
                    False,
                    note,
                    ivs,
                )
            )
            continue
        diff, paired = diff_ci(seeds[win], seeds[rival])
        if not m.decides:
            verdict_, note = DESCRIPTIVE, "descriptive: the paper's finding does not rank the variants on it"
        elif diff.lo is None:
            verdict_, note = INCONCLUSIVE, ONE_SEED
        elif diff.covers_zero():
            verdict_, note = INCONCLUSIVE, "the difference's interval covers zero"
        else:
            verdict_, note = (AGREES if win in m.paper_best else DISAGREES), ""
        out.append(Outcome(m.key, verdict_, m.paper_best, win, rival, diff, paired, note, ivs))
    return out
