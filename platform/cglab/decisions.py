"""Every "auto" and None setting of a run, resolved once at start from the config and the machine.

    d = RunDecisions.resolve(cfg)                    # this machine
    d = RunDecisions.resolve(cfg, Machine.target(cfg))   # the machine the run targets (cglab plan)

The attention backend, the compiled fusions, Megatron's fused kernels and wgrad fusion, the Adam kernel, the
grad-scale fold and whether checkpoints are written in the background are decided here and nowhere else:
`cglab.model.codegen.build_model` builds what `ModelDecisions` says (and keeps it on the model, so its masks match
its backend), `cglab.train.step` keeps the `RunDecisions` in its TrainState for every micro-batch and optimizer step
(and the Checkpointer for its writes), and `cglab plan` prints the same object (`RunDecisions.plan_sections`), which
the run logs as plan.json.
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import torch

from cglab.compat import adam, flags
from cglab.config import CGLabConfig, ConfigError, ModelConfig, ParallelConfig, pipeline_stages, recompute_saves_mask


@dataclasses.dataclass(frozen=True)
class Machine:
    """What a run's decisions depend on: CUDA, Transformer Engine, and the Adam Megatron-Core builds there."""

    cuda: bool
    te: bool
    adam_impl: str  # "torch" (AdamW), "te" or "apex" (their FusedAdam)
    note: str = ""

    @classmethod
    def here(cls) -> Machine:
        return cls(torch.cuda.is_available(), flags.HAVE_TE, adam.megatron_adam_impl())

    @classmethod
    def target(cls, cfg: CGLabConfig, te: str = "auto") -> Machine:
        """The machine `cfg` targets, which need not be this one (a GPU preset planned on a laptop). te: "yes" /
        "no" to assume Transformer Engine present / absent, "auto" for this machine's (or the GPU image's)."""
        cuda, here = cfg.parallel.use_gpu, torch.cuda.is_available()
        if te != "auto":
            has_te, note = te == "yes", f"Transformer Engine {'assumed' if te == 'yes' else 'assumed absent'}"
        elif cuda and not here:
            # The shipped GPU images (clusters/Dockerfile, clusters/aws-p5.yaml) install `.[gpu]`, which has TE.
            has_te, note = (
                True,
                (
                    "planned on a machine without CUDA for a GPU run: decisions are for the shipped "
                    "GPU image (clusters/Dockerfile, `pip install .[gpu]`, Transformer Engine "
                    "installed); pass --te no for a GPU host without it"
                ),
            )
        else:
            has_te, note = flags.HAVE_TE, ""
        if cuda == here and has_te == flags.HAVE_TE:
            impl = adam.megatron_adam_impl()  # planning for this machine: what Megatron really imported
        else:
            impl = "te" if has_te else "torch"
        return cls(cuda, has_te, impl, note)


def choose_backend(
    backend: str, attention_dropout: float = 0.0, cuda: bool | None = None, recompute_masks: bool = False
) -> tuple[str, str]:
    """(backend, why) for `model.attention_backend` on a machine with or without CUDA (None: this one).

    auto never picks Transformer Engine, even where the GPU image installs it: TE's DotProductAttention ignores a
    dense mask when the mask type is causal (documents and prefix-LM would silently attend across their
    boundaries), and no TE path has been measured on a GPU. An explicit `te` is refused with document masking or
    prefix-LM by the config check (cglab.config.cross_field_errors).
    """
    if backend != "auto":
        return backend, "set by model.attention_backend"
    if cuda is None:
        cuda = torch.cuda.is_available()
    if not cuda:
        return "sdpa", "auto on CPU: SDPA with dense masks (FlexAttention has no CPU backward)"
    if recompute_masks:  # the config check refuses an explicit flex here (cglab.config.cross_field_errors)
        return "sdpa", (
            "auto on GPU where Megatron's recomputation takes the mask as an input (cglab.config."
            "recompute_saves_mask): SDPA with dense masks, since a FlexAttention BlockMask is not a tensor"
        )
    if attention_dropout == 0:
        return "flex", "auto on GPU: FlexAttention block masks (measured; Transformer Engine is never chosen by auto)"
    return "sdpa", "auto on GPU with model.attention_dropout > 0, which FlexAttention lacks: SDPA with dense masks"


def resolve_backend(backend: str, attention_dropout: float = 0.0, cuda: bool | None = None) -> str:
    """auto -> flex (GPU, no attention dropout) | sdpa (otherwise); see choose_backend."""
    return choose_backend(backend, attention_dropout, cuda)[0]


class Recompute(NamedTuple):
    """Megatron-Core's activation recomputation settings (TransformerConfig fields of the same names)."""

    granularity: str | None  # None | "selective" | "full"
    method: str | None  # full: "uniform" | "block"
    num_layers: int | None  # full: layers per uniform unit, or recomputed per stage (block)
    modules: tuple[str, ...] = ()  # selective: Megatron's recompute_modules

    @classmethod
    def resolve(cls, m: ModelConfig, stage_layers: int) -> Recompute:
        """stage_layers: the most layers on one pipeline stage (block's default recomputes all of them)."""
        if m.recompute == "none":
            return cls(None, None, None)
        if m.recompute == "selective":
            return cls("selective", None, None, ("core_attn",))
        method = m.recompute_method or "uniform"
        return cls("full", method, m.recompute_num_layers or (1 if method == "uniform" else stage_layers))

    def describe(self) -> str:
        if self.granularity is None:
            return "none: every layer keeps its activations for backward"
        if self.granularity == "selective":
            return "selective: the core attention is recomputed in backward (Megatron's core_attn)"
        if self.method == "uniform":
            return f"full, uniform: each unit of {self.num_layers} layer(s) keeps only its input and reruns in backward"
        return f"full, block: the first {self.num_layers} layer(s) of each stage keep only their input"


@dataclasses.dataclass(frozen=True)
class ModelDecisions:
    """How the model is built and fed on a machine with or without CUDA."""

    cuda: bool
    attention_backend: str  # "local" | "sdpa" | "flex" | "te"
    attention_why: str
    fuse_attention: bool  # the compiled qkv + rotary attention and one-pass residual sum (cglab.model.fused)
    compile_loss: bool  # the LM loss through cglab.model.fused.cross_entropy (TP=1)
    fused_kernels: bool  # Megatron's fused bias-gelu and cross-entropy (CUDA)
    wgrad_fusion: bool  # gradient_accumulation_fusion (CUDA; cglab.compat.wgrad without Apex)
    recompute: Recompute = Recompute(None, None, None)

    @classmethod
    def resolve(cls, m: ModelConfig, p: ParallelConfig | None = None, cuda: bool | None = None) -> ModelDecisions:
        cuda = torch.cuda.is_available() if cuda is None else cuda
        backend, why = choose_backend(m.attention_backend, m.attention_dropout, cuda, recompute_saves_mask(m))
        try:
            stage_layers = max(pipeline_stages(m.num_layers, p)) if p is not None else m.num_layers
        except ValueError:  # an unsplittable layout: the config check reports it; plan on an even estimate
            stage_layers = -(-m.num_layers // p.pipeline_model_parallel_size)
        fuse = m.compile_fusions is not False  # None: wherever it applies
        tp = p.tensor_model_parallel_size if p is not None else 1
        return cls(
            cuda,
            backend,
            why,
            fuse and backend in ("sdpa", "flex"),
            fuse and tp == 1,
            cuda and m.fused_kernels,
            cuda and m.wgrad_fusion,
            Recompute.resolve(m, stage_layers),
        )


class AdamPlan(NamedTuple):
    impl: str  # the Adam class Megatron builds: "torch" (AdamW), "te" or "apex" (their FusedAdam)
    fused: bool  # one fused kernel launch per step
    fold: bool  # train.fold_grad_scale in effect


def adam_plan(cfg: CGLabConfig, cuda: bool, impl: str = "torch") -> AdamPlan:
    """Which Adam kernel runs and whether train.fold_grad_scale is in effect, for the Adam Megatron builds (`impl`)
    on a machine with or without CUDA. Only torch's fused AdamW takes a grad scale: with Transformer Engine
    installed (the GPU images), Megatron builds TE's FusedAdam, so the default fold is off there and an explicit
    `train.fold_grad_scale=true` is refused."""
    t = cfg.train
    if impl != "torch":
        if t.fold_grad_scale:
            raise ConfigError(
                f"train.fold_grad_scale: Megatron-Core builds {impl.upper()}'s FusedAdam here "
                f"({'Transformer Engine' if impl == 'te' else 'Apex'} is installed), whose kernel takes "
                f"no grad scale; set train.fold_grad_scale=null or false"
            )
        return AdamPlan(impl, True, False)
    fused = t.fused_adam and (cuda or t.fold_grad_scale is True)
    if t.fold_grad_scale is None:
        return AdamPlan(impl, fused, fused and not cfg.parallel.use_distributed_optimizer)
    return AdamPlan(impl, fused, t.fold_grad_scale)


def _optimizer_state(p: ParallelConfig) -> str:
    """Where Adam's state lives, and why (parallel.distributed_optimizer)."""
    why = "parallel.distributed_optimizer" if p.distributed_optimizer is not None else "the default where DP > 1 on GPU"
    if p.use_distributed_optimizer:
        return f"split over DP={p.data_parallel_size} (distributed optimizer, ZeRO-1: {why})"
    if p.distributed_optimizer is None:
        return "whole on every rank (the distributed optimizer is the default only where DP > 1 on GPU)"
    return "whole on every rank (parallel.distributed_optimizer=false)"


def async_save(setting: bool | None, cuda: bool) -> tuple[bool, str]:
    """(on, why) for train.async_save on a machine with or without CUDA."""
    if setting is not None:
        return setting, "set by train.async_save"
    if cuda:
        return True, (
            "auto on GPU: the step waits only for the copy to host memory; a forked process writes while the "
            "GPU trains (Megatron-Core's async dist_checkpointing save)"
        )
    return False, "auto on CPU: a background writer would compete with training for the same cores"


@dataclasses.dataclass(frozen=True)
class RunDecisions:
    machine: Machine
    model: ModelDecisions
    adam: AdamPlan | None  # None when refused (adam_error)
    adam_error: str | None = None
    async_save: bool = False  # train.async_save in effect (cglab.train.checkpoint_writes)
    async_save_why: str = ""

    @classmethod
    def resolve(cls, cfg: CGLabConfig, machine: Machine | None = None) -> RunDecisions:
        machine = machine or Machine.here()
        try:
            plan, error = adam_plan(cfg, machine.cuda, machine.adam_impl), None
        except ConfigError as err:
            plan, error = None, str(err)
        model = ModelDecisions.resolve(cfg.model, cfg.parallel, machine.cuda)
        return cls(machine, model, plan, error, *async_save(cfg.train.async_save, machine.cuda))

    def require(self) -> RunDecisions:
        """self, or the ConfigError a run refuses to start with."""
        if self.adam_error:
            raise ConfigError(self.adam_error)
        return self

    def plan_sections(self, cfg: CGLabConfig) -> dict:
        """The decisions as `cglab plan` prints them (its attention_backend, fusions and adam entries)."""
        md, m, cuda = self.model, cfg.model, self.machine.cuda
        masks = [
            x
            for x, on in (("packed documents", m.document_masking), ("prefix-LM", m.architecture == "prefix_lm"))
            if on
        ]
        kind = (
            "FlexAttention block masks"
            if md.attention_backend == "flex" and cuda
            else "dense [b, 1, s, s] masks"
            if masks
            else "causal kernel, no mask tensor"
        )
        compiled = "torch.compile" if cuda else "eager, same maths (CPU)"
        fusions = {
            "attention_glue": f"on ({compiled})" if md.fuse_attention else "off",
            "residual_sum": f"on ({compiled})" if md.fuse_attention else "off",
            "lm_loss": f"on ({compiled})" if md.compile_loss else "off",
            "bias_gelu_and_cross_entropy": "on (Megatron's fused kernels)" if md.fused_kernels else "off",
            "wgrad_fusion": "on (fp32 main grad accumulated in the GEMM)" if md.wgrad_fusion else "off",
        }
        rc = md.recompute
        impl = self.machine.adam_impl
        if self.adam is None:
            adam_out = {"implementation": f"{impl.upper()} FusedAdam", "fold_grad_scale": "refused"}
        else:
            name = {"te": "Transformer Engine FusedAdam", "apex": "Apex FusedAdam"}.get(
                impl, "torch AdamW, fused kernel" if self.adam.fused else "torch AdamW, foreach (Megatron's default)"
            )
            adam_out = {
                "implementation": name,
                "fold_grad_scale": self.adam.fold,
                "distributed_optimizer": cfg.parallel.use_distributed_optimizer,
                "optimizer_state": _optimizer_state(cfg.parallel),
            }
        return {
            "attention_backend": {
                "backend": md.attention_backend,
                "why": md.attention_why,
                "masks": masks or ["causal only"],
                "mask_kind": kind,
            },
            "fusions": fusions,
            "recompute": {
                "granularity": rc.granularity or "none",
                "method": rc.method,
                "num_layers": rc.num_layers,
                "what": rc.describe(),
            },
            "adam": adam_out,
            "checkpoint": {
                "async_save": self.async_save,
                "why": self.async_save_why,
                "complete": (
                    "at the first step boundary after every rank's background write ended; preemption and the "
                    "last step wait for it"
                    if self.async_save
                    else "when the step's write ends"
                ),
            },
        }
