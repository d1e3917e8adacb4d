"""The five CodeGen2 lessons as experiment definitions: variants are config overrides on one base config.

Each `Lesson` says what it varies, what it holds fixed, which metrics decide it and what the paper found
(Nijkamp et al., 2023, "CodeGen2: Lessons for Training LLMs on Programming and Natural Languages").
Unless the lesson is about compute (lesson 5), every variant of a lesson trains the same number of steps at
the same global batch and sequence length, so compute (and tokens seen) is equal across variants.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

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
    # Variants the paper expects to come out best on this metric (any of them winning agrees with it).
    paper_best: tuple[str, ...] = ()
    # A winner within this relative margin of a paper_best variant counts as a tie, i.e. agreement.
    tie_rel: float = 0.01


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
        raise KeyError(f"lesson {self.number} has no variant {name!r}; "
                       f"choose one of {[v.name for v in self.variants]}")

    def config_for(self, variant: str, base: CGLabConfig, seed: int | None = None,
                   cross_field: bool = True) -> CGLabConfig:
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

    def configs(self, base: CGLabConfig, seeds: tuple[int, ...] | None = None) -> dict[tuple[str, int | None],
                                                                                         CGLabConfig]:
        """Every (variant, seed) config, validated up front so a bad one fails before any trial starts."""
        return {(v.name, s): self.config_for(v.name, base, s)
                for v in self.variants for s in (seeds or (None,))}


_FIXED_COMPUTE = ("train.train_steps", "train.global_batch_size", "data.seq_length", "model.*", "train.lr")


def build_lessons(infill_rate: float = 0.5) -> dict[int, Lesson]:
    objectives = {
        "codegen2": ("objective.kind=codegen2", "objective.causal_prob=0.5"),
        "ul2": ("objective.kind=ul2",),
    }
    lesson1 = Lesson(
        1, "prefix-lm", "Does a prefix-LM beat a causal decoder?",
        variants=tuple(
            Variant(f"{arch}-{obj}", (f"model.architecture={arch}", *objectives[obj]))
            for arch in ("causal", "prefix_lm") for obj in ("codegen2", "ul2")),
        fixed=_FIXED_COMPUTE + ("data.mixture", "objective.corruption"),
        metrics=(Metric(CODE_PPL, "min", ("causal-codegen2", "causal-ul2")),
                 Metric(PASS_AT_1, "max", ("causal-codegen2", "causal-ul2")),
                 Metric(INFILL_PPL, "min", ("causal-codegen2", "causal-ul2", "prefix_lm-codegen2",
                                            "prefix_lm-ul2"))),
        finding="The prefix-LM gave no consistent gain over a causal decoder on left-to-right code "
                "generation or infill, so the simpler causal decoder is kept.")
    lesson2 = Lesson(
        2, "infill", "Is infill a free lunch?",
        variants=(Variant("clm", ("objective.kind=clm",)),
                  Variant(f"infill-r{infill_rate:g}", ("objective.kind=infill",
                                                       f"objective.infill_rate={infill_rate}"))),
        fixed=_FIXED_COMPUTE + ("data.mixture", "model.architecture"),
        metrics=(Metric(CODE_PPL, "min", ("clm",)),
                 Metric(PASS_AT_1, "max", ("clm",)),
                 Metric(INFILL_PPL, "min", (f"infill-r{infill_rate:g}",))),
        finding="Infill training is not a free lunch: at equal compute it costs some left-to-right "
                "quality compared with pure causal LM, in exchange for the infill ability.")
    lesson3 = Lesson(
        3, "objective", "Simple but carefully chosen objective",
        # CLM corrupts nothing, so file- vs sequence-level corruption would give two identical runs.
        variants=(Variant("clm", ("objective.kind=clm",)),) + tuple(
            Variant(f"{name}-{corr}", (*ovr, f"objective.corruption={corr}"))
            for name, ovr in (("span_corruption", ("objective.kind=span_corruption",)),
                              ("codegen2", objectives["codegen2"]))
            for corr in ("file_level", "sequence_level")),
        fixed=_FIXED_COMPUTE + ("data.mixture", "model.architecture", "objective.mask_ratio_*"),
        metrics=(Metric(CODE_PPL, "min", ("clm", "codegen2-file_level"), tie_rel=0.03),
                 Metric(PASS_AT_1, "max", ("clm", "codegen2-file_level"), tie_rel=0.03),
                 Metric(INFILL_PPL, "min", ("codegen2-file_level", "span_corruption-file_level"))),
        finding="Mixing causal LM (p=0.5) with file-level span corruption keeps left-to-right quality "
                "competitive with pure causal LM while adding infill; file-level beats sequence-level.")
    lesson4 = Lesson(
        4, "nl-pl-mix", "Mixing natural and programming language",
        variants=tuple(Variant(m, (f"data.mixture={m}",)) for m in ("pl_only", "nl_only", "mix")),
        fixed=_FIXED_COMPUTE + ("objective.kind", "model.architecture"),
        metrics=(Metric(CODE_PPL, "min", ("pl_only",)),
                 Metric(NL_PPL, "min", ("nl_only",)),
                 Metric(PASS_AT_1, "max", ("pl_only",))),
        finding="At equal compute a 50/50 NL+PL mixture is competitive on both domains but does not beat "
                "the domain-specific model on its own domain.")
    lesson5 = Lesson(
        5, "multi-epoch", "Multi-epoch training",
        variants=tuple(Variant(f"epochs-{e}", (f"train.epochs={e}",), steps_multiplier=e) for e in (1, 2, 5)),
        # Unique tokens = base train_steps x global batch x seq; LR decays over all epochs' steps.
        fixed=("data.sources", "data.mixture", "train.global_batch_size", "data.seq_length", "model.*",
               "objective.kind", "train.lr (decay horizon = train.train_steps of the variant)"),
        metrics=(Metric(CODE_PPL, "min", ("epochs-5",)),
                 Metric(PASS_AT_1, "max", ("epochs-5",))),
        finding="Several epochs over the same data, with span corruption re-sampled each epoch and the LR "
                "decayed over the whole budget, keep improving the model (CodeGen2.5 trains 5 epochs).",
        equal_compute=False)
    return {l.number: l for l in (lesson1, lesson2, lesson3, lesson4, lesson5)}


LESSONS: dict[int, Lesson] = build_lessons()


def get_lesson(number: int | str, **options) -> Lesson:
    lessons = build_lessons(**options) if options else LESSONS
    try:
        return lessons[int(number)]
    except (KeyError, ValueError):
        raise ConfigError(f"lesson {number!r}: choose one of {sorted(lessons)}") from None


@dataclass(frozen=True)
class Outcome:
    metric: str
    winner: str | None
    runner_up: str | None
    margin_rel: float | None  # |winner - runner_up| / |runner_up|
    paper_best: tuple[str, ...]
    agrees: bool | None  # None: metric not measured
    note: str = ""
    values: dict[str, float] = field(default_factory=dict)


def verdict(lesson: Lesson, results: dict[str, dict[str, float]]) -> list[Outcome]:
    """results: variant -> {metric: value} (e.g. mean over seeds). Which variant won each decision metric,
    by how much, and whether that agrees with the paper."""
    out = []
    for m in lesson.metrics:
        vals = {v: r[m.key] for v, r in results.items() if r.get(m.key) is not None and r[m.key] == r[m.key]}
        if not vals:
            out.append(Outcome(m.key, None, None, None, m.paper_best, None, "not measured"))
            continue
        order = sorted(vals, key=vals.get, reverse=m.goal == "max")
        win = order[0]
        second = order[1] if len(order) > 1 else None
        margin = (abs(vals[win] - vals[second]) / abs(vals[second]) if second is not None and vals[second]
                  else None)
        agrees, note = win in m.paper_best, ""
        if not agrees:
            close = [b for b in m.paper_best if b in vals
                     and abs(vals[b] - vals[win]) <= m.tie_rel * max(abs(vals[win]), 1e-12)]
            if close:
                agrees, note = True, f"tie within {m.tie_rel:.0%} with {close[0]}"
        out.append(Outcome(m.key, win, second, margin, m.paper_best, agrees, note, vals))
    return out
