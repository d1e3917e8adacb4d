"""The five CodeGen2 lessons as experiment definitions: variants are config overrides on one base config.

Each `Lesson` says what it varies, what it holds fixed and equal (`held_equal`), which metrics it reports, what
the paper found (Nijkamp et al., 2023, "CodeGen2: Lessons for Training LLMs on Programming and Natural
Languages"), and, declared here before any run, the contrasts that decide it: fixed pairs of variants, each with
its test (superiority, non-inferiority, equivalence by TOST) and margin in bits per byte. `cglab.tune.verdicts`
decides those contrasts and nothing else.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from cglab.config import CGLabConfig, ConfigError, from_dict

# Final metrics the training/eval step reports (see cglab.eval.checkpoint_eval). The contrasts decide on bits
# per byte (total NLL in bits / UTF-8 bytes scored): a mean over seeds of a log-likelihood, never of a
# perplexity (whose mean over seeds is dominated by the worst seed), and comparable across tokenizers.
CODE_BPB = "eval/code_bpb"  # left-to-right, held-out code
NL_BPB = "eval/nl_bpb"  # left-to-right, held-out natural language
INFILL_BPB = "eval/infill_bpb"  # the middle given the prompt prefix <mask_1> suffix <eot> <sep> <mask_1>
PASS_AT_1 = "eval/humaneval_pass_at_1"  # not "pass@1": MLflow rejects "@" in metric names (the whole batch)
LOSS = "loss"

# Margins in bits per byte: the smallest difference a lesson treats as real. Measured in the committed study
# (benchmarks/results/lessons_study.md, 3 seeds, sequence 128): one variant's seed-to-seed SD is about 0.006-0.01
# bpb on code and 0.02-0.03 on NL (95% half-widths 0.005-0.02 and 0.03-0.08), while the effects the paper calls
# real are 5-20x larger (codegen2 vs UL2: 0.15 bpb on code; 5 epochs vs 1: 0.36). So a margin of about 2-3 seed
# SDs, under 1% of the metric's level (code ~2.9, NL ~3.6 bpb): wide enough that the paired interval of 3 seeds
# can fall inside it (equivalence can be shown), narrow next to the paper's effects. Infill bpb is new (no study
# has measured it); its perplexity varied ~17% between seeds, so it gets NL's wider margin until `cglab plan`
# sizes it from a pilot.
CODE_MARGIN = 0.02
NL_MARGIN = 0.05
INFILL_MARGIN = 0.05

# What a lesson holds equal across its variants (`Lesson.held_equal`; the feed logs data/raw_tokens and
# data/loss_tokens per step of every trial): raw tokens (document tokens that entered the windows, which the
# packer's reserve and padding make differ between objectives at equal steps), tokens that carry a loss, FLOPs
# (equal steps of one model and sequence length), or (lesson 5, whose question is compute) the unique tokens.
# A run holds raw or loss tokens to a budget with train.stop_at / train.token_budget; the lessons' presets do not
# set it yet (their trials still run equal steps, i.e. equal FLOPs), so a report reads the logged counts.
RAW_TOKENS, LOSS_TOKENS, FLOPS, UNIQUE_TOKENS = "raw_tokens", "loss_tokens", "flops", "unique_tokens"
HeldEqual = Literal["raw_tokens", "loss_tokens", "flops", "unique_tokens"]

SUPERIORITY, NON_INFERIORITY, EQUIVALENCE = "superiority", "non_inferiority", "equivalence"
Test = Literal["superiority", "non_inferiority", "equivalence"]


@dataclass(frozen=True)
class Metric:
    key: str
    goal: Literal["min", "max"]


@dataclass(frozen=True)
class Contrast:
    """A comparison declared before any run: the paper's claim about variant a against variant b on one metric.

    superiority      a is better than b (H0: a no better). `margin` is the smallest effect the lesson is sized
                     to see (`cglab plan`'s seeds), not a hurdle: any significant gain agrees.
    non_inferiority  a is worse than b by less than `margin` (H0: worse by margin or more).
    equivalence      a and b differ by less than `margin` either way (TOST: both one-sided nulls rejected).

    "Better" follows the metric's goal (lower bpb, higher pass@1); `margin` is in the metric's units."""

    a: str
    b: str
    metric: str
    test: Test
    margin: float
    claim: str = ""  # the paper's words the contrast tests

    @property
    def name(self) -> str:
        return f"{self.a} vs {self.b} on {self.metric}"


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
    metrics: tuple[Metric, ...]  # reported (table, curves); those a contrast names decide
    finding: str  # the paper's finding, one sentence
    equal_compute: bool = True
    contrasts: tuple[Contrast, ...] = ()  # what decides the lesson, declared before any run
    held_equal: HeldEqual = RAW_TOKENS

    def __post_init__(self):
        names = [v.name for v in self.variants]
        goals = {m.key for m in self.metrics}
        seen = set()
        for c in self.contrasts:
            where = f"lesson {self.number} contrast {c.name!r}"
            for side in (c.a, c.b):
                if side not in names:
                    raise ConfigError(f"{where}: no variant {side!r} in the lesson (variants: {names})")
            if c.a == c.b:
                raise ConfigError(f"{where}: compares a variant with itself")
            if c.metric not in goals:
                raise ConfigError(f"{where}: metric {c.metric!r} is not among the lesson's metrics {sorted(goals)}")
            if c.test not in (SUPERIORITY, NON_INFERIORITY, EQUIVALENCE):
                raise ConfigError(f"{where}: test {c.test!r}: choose superiority, non_inferiority or equivalence")
            if not c.margin > 0:
                raise ConfigError(f"{where}: margin {c.margin!r} must be > 0 (in the metric's units)")
            if c.name in seen:
                raise ConfigError(f"{where}: declared twice")
            seen.add(c.name)

    @property
    def experiment(self) -> str:
        return f"codegen2/lesson-{self.number}-{self.slug}"

    def metric(self, key: str) -> Metric:
        return next(m for m in self.metrics if m.key == key)

    def contrast(self, name: str | Contrast) -> Contrast:
        """The declared contrast of that name (or equal to it); a ConfigError naming it otherwise: a lesson
        decides only what it declared before its runs."""
        for c in self.contrasts:
            if c == name or c.name == name:
                return c
        label = name.name if isinstance(name, Contrast) else name
        raise ConfigError(
            f"lesson {self.number} did not declare the contrast {label!r}; its contrasts: "
            f"{[c.name for c in self.contrasts]}"
        )

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
    infill = f"infill-r{infill_rate:g}"
    code, nl, fill = Metric(CODE_BPB, "min"), Metric(NL_BPB, "min"), Metric(INFILL_BPB, "min")
    # pass@1 is reported, never decided: at the scales cglab runs here it is 0 for every variant, and a rate has
    # no margin in bits per byte.
    passk = Metric(PASS_AT_1, "max")
    no_gain = "The prefix-LM gave no consistent gain over a causal decoder"
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
        metrics=(code, fill, passk),
        finding="The prefix-LM gave no consistent gain over a causal decoder on left-to-right code "
        "generation or infill, so the simpler causal decoder is kept.",
        # A null claim ("no consistent gain") is an equivalence, for each objective and both tasks; a
        # superiority test could only ever fail to find a difference, never show there is none.
        contrasts=tuple(
            Contrast(f"prefix_lm-{obj}", f"causal-{obj}", m.key, EQUIVALENCE, margin, no_gain)
            for obj in ("codegen2", "ul2")
            for m, margin in ((code, CODE_MARGIN), (fill, INFILL_MARGIN))
        ),
        # Raw tokens, not loss tokens: the paper's suspected cost of the prefix-LM is "a lack of gradient
        # updates" on its loss-masked prefix; equal loss tokens would train it longer and hide that cost.
        held_equal=RAW_TOKENS,
    )
    lesson2 = Lesson(
        2,
        "infill",
        "Is infill a free lunch?",
        variants=(
            Variant("clm", ("objective.kind=clm",)),
            Variant(infill, ("objective.kind=infill", f"objective.infill_rate={infill_rate}")),
        ),
        fixed=_FIXED_COMPUTE + ("data.mixture", "model.architecture"),
        metrics=(code, fill, passk),
        finding="Infill training is not a free lunch: at equal compute it costs some left-to-right "
        "quality compared with pure causal LM, in exchange for the infill ability.",
        contrasts=(
            Contrast("clm", infill, CODE_BPB, SUPERIORITY, CODE_MARGIN, "infill is not a free lunch"),
            Contrast(infill, "clm", INFILL_BPB, SUPERIORITY, INFILL_MARGIN, "in exchange for the infill ability"),
        ),
        held_equal=RAW_TOKENS,  # the price of infill is paid in the same compute; that is the lesson
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
        metrics=(code, fill, passk),
        finding="Mixing causal LM (p=0.5) with file-level span corruption keeps left-to-right quality "
        "competitive with pure causal LM while adding infill; file-level beats sequence-level.",
        # The fixed pair the paper's claim names, never the best of each side of the results.
        contrasts=(
            Contrast(
                "codegen2-file_level",
                "clm",
                CODE_BPB,
                NON_INFERIORITY,
                CODE_MARGIN,
                "a simple combination of objectives ... zero-shot performance preserved",
            ),
            Contrast("codegen2-file_level", "clm", INFILL_BPB, SUPERIORITY, INFILL_MARGIN, "while adding infill"),
        ),
        # Raw tokens: codegen2 carries a loss on fewer of them (span corruption's masked input has none), and
        # whether left-to-right quality survives that at equal compute is the claim.
        held_equal=RAW_TOKENS,
    )
    similar = "Mix performs similarly to the domain-matched models"
    lesson4 = Lesson(
        4,
        "nl-pl-mix",
        "Mixing natural and programming language",
        variants=tuple(Variant(m, (f"data.mixture={m}",)) for m in ("pl_only", "nl_only", "mix")),
        fixed=_FIXED_COMPUTE + ("objective.kind", "model.architecture"),
        metrics=(code, nl, passk),
        finding="At equal compute a 50/50 NL+PL mixture is competitive on both domains but does not beat "
        "the domain-specific model on its own domain.",
        # "Performs similarly" read as equivalence, per domain: the sentence is two-sided, and the finding adds
        # that the mix "does not beat the domain-specific model". Non-inferiority would count a mix far better
        # than the domain model (positive transfer, a different finding) as agreement.
        contrasts=(
            Contrast("mix", "pl_only", CODE_BPB, EQUIVALENCE, CODE_MARGIN, similar),
            Contrast("mix", "nl_only", NL_BPB, EQUIVALENCE, NL_MARGIN, similar),
        ),
        held_equal=RAW_TOKENS,
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
        metrics=(code, passk),
        finding="Several epochs over the same data, with span corruption re-sampled each epoch and the LR "
        "decayed over the whole budget, keep improving the model (CodeGen2.5 trains 5 epochs).",
        equal_compute=False,
        # A plain tuple: an equal-compute arm on fresh data or a corruption-drawn-once arm adds its pair here.
        contrasts=(Contrast("epochs-5", "epochs-1", CODE_BPB, SUPERIORITY, CODE_MARGIN, "keep improving the model"),),
        held_equal=UNIQUE_TOKENS,  # more epochs cost more compute: the lesson is about that
    )
    return {les.number: les for les in (lesson1, lesson2, lesson3, lesson4, lesson5)}


LESSONS: dict[int, Lesson] = build_lessons()


def get_lesson(number: int | str, **options) -> Lesson:
    lessons = build_lessons(**options) if options else LESSONS
    try:
        return lessons[int(number)]
    except (KeyError, ValueError):
        raise ConfigError(f"lesson {number!r}: choose one of {sorted(lessons)}") from None
