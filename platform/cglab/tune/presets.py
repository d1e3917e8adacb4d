"""Scales at which a lesson runs: laptop (minutes on 2 CPU cores), 1gpu (hours on one H100), cluster
(codegen2-1B, TP=2 x DP=4 = 8 GPUs per trial). A preset is config overrides plus what each trial's Tune
driver function asks for; the Train workers' resources follow from the config's parallel section."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import yaml

from cglab.config import PRESETS as MODEL_SHAPES
from cglab.config import CGLabConfig, ConfigError, apply_overrides, from_dict
from cglab.data.corpus import build_corpus, build_package_corpus, corpus_sources
from cglab.train.plan import max_concurrent, trial_resources  # noqa: F401  (a preset's trials' resources)


def _shape(name: str) -> tuple[str, ...]:
    # Explicit fields, not `model.preset=`: a preset name loses to explicit fields already in a config.
    return tuple(f"model.{k}={v}" for k, v in MODEL_SHAPES[name].items())


# A trial of the CPU presets: one Ray Train worker on one CPU, fp32, no model parallelism.
_ONE_CPU_WORKER = (
    "train.precision=fp32",
    "parallel.tensor_model_parallel_size=1",
    "parallel.pipeline_model_parallel_size=1",
    "parallel.data_parallel_size=1",
    "parallel.use_gpu=false",
    "parallel.cpus_per_worker=1",
)


@dataclass(frozen=True)
class Preset:
    name: str
    description: str
    overrides: tuple[str, ...]
    driver_cpus: float = 1.0  # the Tune trial function launches and watches the Train job, then evaluates
    # Logical CPUs left free per trial for the Ray Data tasks its workers start (read/tokenize/pack/corrupt);
    # without them a trial whose workers hold the last CPUs waits forever for its own data.
    data_cpus: float = 1.0
    # Default seeds (`cglab ablate --seeds` overrides). A verdict needs at least two (see verdicts.verdict): with
    # one, every metric reads "inconclusive (one seed, no verdict)".
    seeds: tuple[int, ...] = (1234,)
    trial_max_failures: int = 0  # Tune-level retries of a whole trial (Train resumes from its checkpoint)
    # What `cglab ablate` trains on when the config names no data.sources: "micro" (the embedded micro corpus),
    # "packages" (the installed packages' code and docs, STUDY_CORPUS's budgets), None (the config must say).
    corpus: str | None = None


PRESETS: dict[str, Preset] = {
    "laptop": Preset(
        "laptop",
        "tiny model, 1 CPU worker per trial, one lesson in minutes on 2 cores",
        _shape("tiny")
        + (
            "data.seq_length=128",
            "train.micro_batch_size=4",
            "train.global_batch_size=8",
            # A step takes ~0.04 s here; a trial's cost is start-up and evaluation, so 100 steps are cheap.
            "train.train_steps=100",
            "train.warmup_steps=10",
            "train.lr=2e-3",
            "train.min_lr=2e-4",
            # The dedup table is a Ray Data shuffle per trial, longer than the training itself at this scale;
            # the held-out split still excludes its copies from training (cglab.data.heldout).
            "data.filters.dedup=false",
            # ray.train.report costs ~2 s a call on CPU here; MLflow still gets every step from rank 0.
            "train.log_every=50",
            *_ONE_CPU_WORKER,
            "eval.suites=[nl]",
            "eval.limit=8",
            "eval.max_new_tokens=32",
            # held-out curves while training (cglab.eval.periodic): due at 25, 50, 75; the final evaluation is the
            # point at 100. A due step whose previous evaluation still runs is skipped (eval/skipped): here 100
            # steps train in ~8 s and one evaluation takes ~3.5 s plus its Ray worker's start, so measured on 2
            # cores a trial gets the point at 25 (50 and 75 skipped) and the final one; longer runs get them all.
            # Half a CPU for the task: a trial (0.5 driver + 1 worker + 1 data) with it still fits 3 logical CPUs.
            "eval.every=25",
            "eval.task_cpus=0.5",
            "track.system_metrics=true",
        ),
        driver_cpus=0.5,
        # One seed: `make demo` stays at about 95 s on 2 cores, and its verdicts say "one seed, no verdict".
        # `cglab ablate N --seeds 1 2 3` buys the intervals (three times the trials).
        seeds=(1234,),
        corpus="micro",
    ),
    "study": Preset(
        "study",
        "small model (d128 L2) on the installed packages' code and docs, 7 seeds; a lesson in <= ~70 min on 2 cores",
        (
            # Sized on this 2-core machine (benchmarks/lessons_study.py): a trial costs ~40 s of start-up and
            # evaluation plus its steps (~0.17 s each with a periodic evaluation beside them), so 240 steps keep
            # the costliest lesson (5: 3 seeds x 1+2+5 epochs) under 30 minutes (at 7 seeds: ~66).
            "model.num_layers=2",
            "model.hidden_size=128",
            "model.num_attention_heads=4",
            "model.rotary_dim=16",
            "model.vocab_size=1024",
            "model.max_position_embeddings=256",
            "data.seq_length=128",
            "train.micro_batch_size=8",
            "train.global_batch_size=16",
            "train.train_steps=240",
            "train.warmup_steps=24",
            "train.lr=2e-3",
            "train.min_lr=2e-4",
            "data.filters.dedup=false",  # as laptop: the held-out split is still deduplicated against training
            "train.log_every=120",
            *_ONE_CPU_WORKER,
            "eval.suites=[nl]",  # no HumanEval: pass@1 of a model this small would be 0 everywhere ("not measured")
            "eval.limit=8",
            "eval.max_new_tokens=32",
            "eval.every=60",  # curve points at 60, 120, 180 and the final 240: the 4x-shorter run is the first
            "eval.task_cpus=0.5",
            "track.system_metrics=false",
        ),
        driver_cpus=0.5,
        # Seven: what `cglab plan`'s power rule (cglab.tune.power: the paired t-interval's half-width <= margin/2
        # at Holm's first-step level) asks of the committed study (benchmarks/results/lessons_study.md, 3 seeds,
        # commit 20a714d). That file keeps no per-seed values, so the SD of a - b comes from its tables: the
        # paired perplexity interval converted to bpb (bpb = 0.6204 ln ppl on its code set) where it compared the
        # declared pair, else sqrt(sd_a^2 + sd_b^2) from each variant's 95% half-width (uncorrelated seeds; the
        # two declared pairs it did pair showed a correlation of ~0 and below). Seeds needed (SD of a - b, bpb):
        #   lesson 1 (97.5%): prefix_lm vs causal, code: codegen2 7 (0.0085), ul2 5 (0.0051); infill: unknown
        #   lesson 2 (95%):   clm vs infill-r0.5, code 7 (0.0098, paired); infill: unknown (no infill bpb)
        #   lesson 3 (95%):   codegen2-file_level vs clm, code 7 (0.0104); infill: unknown
        #   lesson 4 (95%):   mix vs pl_only, code 5 (0.0074, paired); mix vs nl_only, NL 7 (0.0256)
        #   lesson 5 (90%):   epochs-5 vs epochs-1, code 4 (0.0061)
        # An SD from 3 seeds is loose (its 95% range is about 0.5x-6x), and lesson 1's prefix-LM has changed
        # since: `cglab plan --lesson N --preset study --pilot benchmarks/results/lessons_study.json` re-sizes it
        # from the next study's per-seed values. The cost: the study's 98 minutes become ~230, each lesson < 70.
        seeds=(1, 2, 3, 4, 5, 6, 7),
        corpus="packages",
    ),
    "1gpu": Preset(
        "1gpu",
        "CodeGen 350M shape (d1024 L20), seq 2048, bf16, one GPU per trial, ~130M tokens",
        (
            "model.num_layers=20",
            "model.hidden_size=1024",
            "model.num_attention_heads=16",
            "model.rotary_dim=32",
            "model.vocab_size=51200",
            "model.max_position_embeddings=2048",
            "data.seq_length=2048",
            "train.micro_batch_size=4",
            "train.global_batch_size=32",
            # Sentinels for the most spans a 2048-token unit can need: UL2's X_dense (50%, mean span 3) 227 (lesson 1),
            # codegen2 75 (ratio <= 0.35, mean span 8.5); the laptop's 128 tokens need 14, within the default 16.
            "data.num_sentinels=256",
            "train.train_steps=2000",
            "train.warmup_steps=100",
            "train.lr=3e-4",
            "train.min_lr=3e-5",
            "train.log_every=10",
            "train.precision=bf16",
            "train.checkpoint_every=500",
            "parallel.tensor_model_parallel_size=1",
            "parallel.pipeline_model_parallel_size=1",
            "parallel.data_parallel_size=1",
            "parallel.use_gpu=true",
            "parallel.cpus_per_worker=4",
            "eval.suites=[nl,humaneval,infill]",
            "eval.limit=164",
        ),
        # Three: no pilot at this scale exists; they are the pilot. `cglab plan --lesson N --preset 1gpu --pilot
        # URI` after the first sweep says how many each contrast needs (the CPU study's SDs do not carry over).
        seeds=(1234, 1235, 1236),
        trial_max_failures=2,
    ),
    "cluster": Preset(
        "cluster",
        "codegen2-1B, TP=2 x DP=4 over 8 GPUs per trial, seq 2048, bf16, ~2.6B tokens",
        _shape("codegen2-1B")
        + (
            "data.seq_length=2048",
            "data.num_sentinels=256",  # as 1gpu: UL2's X_dense needs 227 at 2048
            "train.micro_batch_size=4",
            "train.global_batch_size=256",
            "train.train_steps=5000",
            "train.warmup_steps=200",
            "train.lr=3e-4",
            "train.min_lr=3e-5",
            "train.log_every=10",
            "train.precision=bf16",
            "train.checkpoint_every=500",
            "parallel.tensor_model_parallel_size=2",
            "parallel.pipeline_model_parallel_size=1",
            "parallel.data_parallel_size=4",
            "parallel.use_gpu=true",
            "parallel.cpus_per_worker=8",
            "parallel.distributed_optimizer=true",
            "eval.suites=[nl,humaneval,infill]",
        ),
        seeds=(1234, 1235, 1236),  # as 1gpu: the pilot, from which `cglab plan --pilot` sizes the rest
        trial_max_failures=3,
    ),
}


def micro_corpus_sources(root: str | Path = ".cglab/corpus") -> list[dict]:
    """data.sources for the embedded micro corpus under root, built there first if missing."""
    root = Path(root).resolve()  # trials run in other working directories
    if not all((root / k).is_dir() and any((root / k).iterdir()) for k in ("pile", "stack")):
        build_corpus(root)
    return corpus_sources(root)


# The study preset's corpus: code and docs of the installed distributions (cglab.data.corpus), small enough that
# lesson 5's epochs repeat it (base run: 300 steps x 16 x 128 tokens = 0.6M tokens; this is ~9M code tokens).
STUDY_CORPUS = dict(code_bytes=24 << 20, nl_chars=8 << 20)


def package_corpus_sources(root: str | Path = ".cglab/pkgcorpus") -> list[dict]:
    """data.sources for the installed packages' corpus under root (STUDY_CORPUS's budgets), built there first if
    missing (~40 s)."""
    root = Path(root).resolve()
    if not all((root / k).is_dir() and any((root / k).iterdir()) for k in ("pile", "stack")):
        build_package_corpus(root, **STUDY_CORPUS)
    return corpus_sources(root)


def preset_corpus_sources(preset: Preset) -> list[dict]:
    """The corpus a preset falls back to when the config names no data.sources ([] when it has none)."""
    if preset.corpus == "micro":
        return micro_corpus_sources()
    if preset.corpus == "packages":
        return package_corpus_sources()
    return []


def get_preset(name: str) -> Preset:
    if name not in PRESETS:
        raise ConfigError(f"preset {name!r}: choose one of {sorted(PRESETS)}")
    return PRESETS[name]


def base_config(
    preset: str | Preset,
    config_path: str | Path | None = None,
    overrides: list[str] | tuple[str, ...] = (),
    cross_field: bool = True,
) -> CGLabConfig:
    """User YAML (data sources etc.), then the preset, then the user's overrides; validated (cross-field
    constraints too unless cross_field=False, for `cglab plan`, which lists them as errors)."""
    p = get_preset(preset) if isinstance(preset, str) else preset
    data: dict = {}
    if config_path is not None:
        path = Path(config_path)
        if not path.is_file():
            raise ConfigError(f"config file {path} does not exist")
        data = yaml.safe_load(path.read_text()) or {}
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: top level must be a mapping of sections")
    data = apply_overrides(data, list(p.overrides))
    try:
        return from_dict(data, list(overrides), cross_field)
    except ConfigError as err:
        raise ConfigError(f"preset {p.name}: {err}") from None
