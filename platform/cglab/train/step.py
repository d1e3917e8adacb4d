"""One training step on Megatron-Core: model + DDP + optimizer + LR schedule, forward/backward through Megatron's
pipeline schedules, token-weighted loss across micro-batches and data-parallel ranks.

Losses are summed per token (`calculate_per_token_loss`) and Megatron's `finalize_model_grads` divides the
gradients by the number of loss tokens of the whole global batch, so TP, PP, DP and gradient accumulation all give
the loss of the same token-weighted mean.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from functools import partial
from typing import NamedTuple

import torch
from megatron.core import parallel_state
from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
from megatron.core.distributed.finalize_model_grads import finalize_model_grads
from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler
from megatron.core.pipeline_parallel import get_forward_backward_func

from cglab import megatron_foreach, megatron_gradscale
from cglab.config import CGLabConfig, ConfigError, ModelConfig
from cglab.data.contract import OBJECTIVES  # index = a sample's `objective` code
from cglab.model.codegen import batch_mask, build_model


@dataclass
class TrainState:
    model: list[torch.nn.Module]  # one chunk per rank (no virtual pipeline)
    optimizer: object
    scheduler: OptimizerParamScheduler
    grad_fold: megatron_gradscale.GradFold | None = None  # train.fold_grad_scale: the deferred 1/tokens factor


def build_train_state(cfg: CGLabConfig, lr_decay_steps: int | None = None) -> TrainState:
    bf16 = cfg.train.precision == "bf16"
    model = build_model(cfg.model, cfg.parallel, bf16=bf16, seed=cfg.train.seed)
    tc = model.config
    tc.calculate_per_token_loss = True
    tc.finalize_model_grads_func = finalize_model_grads
    if bf16:
        from megatron.core.transformer.module import Float16Module

        model = Float16Module(tc, model)
    ddp_cfg = DistributedDataParallelConfig(
        grad_reduce_in_fp32=True, overlap_grad_reduce=False,
        use_distributed_optimizer=cfg.parallel.distributed_optimizer)
    model = DistributedDataParallel(tc, ddp_cfg, model)
    t = cfg.train
    opt_cfg = OptimizerConfig(
        optimizer="adam", lr=t.lr, min_lr=t.min_lr, weight_decay=t.weight_decay, adam_beta1=t.adam_beta1,
        adam_beta2=t.adam_beta2, clip_grad=t.grad_clip, bf16=bf16, params_dtype=tc.params_dtype,
        use_distributed_optimizer=cfg.parallel.distributed_optimizer)
    megatron_foreach.apply()  # without Apex/TE, Megatron's per-tensor loops sync the device once per parameter
    optimizer = get_megatron_optimizer(opt_cfg, [model])
    plan = adam_plan(cfg, torch.cuda.is_available(), built_adam(optimizer))
    if plan.fused and plan.impl == "torch":
        _use_fused_adam(optimizer)
    fold = megatron_gradscale.install([model], optimizer) if plan.fold else None
    decay = lr_decay_steps or t.train_steps
    scheduler = OptimizerParamScheduler(
        optimizer, init_lr=0.0 if t.warmup_steps else t.lr, max_lr=t.lr, min_lr=t.min_lr,
        lr_warmup_steps=t.warmup_steps, lr_decay_steps=max(decay, t.warmup_steps + 1), lr_decay_style="cosine",
        start_wd=t.weight_decay, end_wd=t.weight_decay, wd_incr_steps=decay, wd_incr_style="constant")
    return TrainState([model], optimizer, scheduler, fold)


class AdamPlan(NamedTuple):
    impl: str  # the Adam class Megatron builds: "torch" (AdamW), "te" or "apex" (their FusedAdam)
    fused: bool  # one fused kernel launch per step
    fold: bool  # train.fold_grad_scale in effect


def megatron_adam_impl() -> str:
    """The Adam Megatron-Core 0.16.1 will build in this process: TE's FusedAdam when Transformer Engine imports,
    else Apex's, else torch's AdamW (megatron/core/optimizer/__init__.py decides at import)."""
    from megatron.core import optimizer as mo

    if mo.USING_PYTORCH_OPTIMIZER:
        return "torch"
    return "te" if mo.Adam.__module__.startswith("transformer_engine") else "apex"


def built_adam(optimizer) -> str:
    """The implementation of the Adam Megatron actually built (what the fold decision must rest on)."""
    impls = {_adam_impl(type(opt.optimizer)) for opt in getattr(optimizer, "chained_optimizers", [optimizer])
             if getattr(opt, "optimizer", None) is not None}
    return "torch" if impls <= {"torch"} else sorted(impls - {"torch"})[0]


def _adam_impl(cls) -> str:
    mod = cls.__module__
    return "te" if mod.startswith("transformer_engine") else "apex" if mod.startswith("apex") else "torch"


def adam_plan(cfg: CGLabConfig, cuda: bool, impl: str = "torch") -> AdamPlan:
    """Which Adam kernel runs and whether train.fold_grad_scale is in effect, for the Adam Megatron builds (`impl`)
    on a machine with or without CUDA. Only torch's fused AdamW takes a grad scale: with Transformer Engine
    installed (the GPU images), Megatron builds TE's FusedAdam, so the default fold is off there and an explicit
    `train.fold_grad_scale=true` is refused."""
    t = cfg.train
    if impl != "torch":
        if t.fold_grad_scale:
            raise ConfigError(f"train.fold_grad_scale: Megatron-Core builds {impl.upper()}'s FusedAdam here "
                              f"({'Transformer Engine' if impl == 'te' else 'Apex'} is installed), whose kernel takes "
                              f"no grad scale; set train.fold_grad_scale=null or false")
        return AdamPlan(impl, True, False)
    fused = t.fused_adam and (cuda or t.fold_grad_scale is True)
    if t.fold_grad_scale is None:
        return AdamPlan(impl, fused, fused and not cfg.parallel.distributed_optimizer)
    return AdamPlan(impl, fused, t.fold_grad_scale)


def _use_fused_adam(optimizer) -> None:
    """Without Apex/TE, Megatron falls back to torch AdamW in its foreach mode; the fused CUDA kernel is one launch."""
    for opt in getattr(optimizer, "chained_optimizers", [optimizer]):
        inner = getattr(opt, "optimizer", None)
        if isinstance(inner, torch.optim.AdamW | torch.optim.Adam):
            for group in inner.param_groups:
                group["fused"], group["foreach"] = True, False


def _device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")


def to_stage_batch(batch: dict, m: ModelConfig) -> dict:
    """Move what this pipeline stage needs to the device: tokens only on the first stage, labels and loss mask
    only on the last; every stage needs the attention mask inputs."""
    dev = _device()
    first = parallel_state.is_pipeline_first_stage()
    last = parallel_state.is_pipeline_last_stage()
    out = {}
    for k in ("segment_ids", "prefix_end"):  # both [b, s]
        if k in batch:
            out[k] = torch.as_tensor(batch[k]).to(dev, non_blocking=True).long()
    s = torch.as_tensor(batch["tokens"]).shape
    out["shape"] = s
    if first:
        out["tokens"] = torch.as_tensor(batch["tokens"]).to(dev).long()
    if last:
        out["labels"] = torch.as_tensor(batch["labels"]).to(dev).long()
        out["loss_mask"] = torch.as_tensor(batch["loss_mask"]).to(dev).float()
        if "objective" in batch:
            out["objective"] = torch.as_tensor(batch["objective"]).to(dev).long()
    return out


def _loss_func(loss_mask: torch.Tensor, objective: torch.Tensor | None, per_token: torch.Tensor):
    per_token = per_token.float()
    masked = per_token * loss_mask
    total = masked.sum()
    n = loss_mask.sum()
    stats = [total.detach(), n.detach()]
    if objective is not None:  # per-objective (sum, count) for the split loss metric
        per_sample, count = masked.sum(1).detach(), loss_mask.sum(1).detach()
        for code in range(len(OBJECTIVES)):
            sel = (objective == code).float()
            stats += [(per_sample * sel).sum(), (count * sel).sum()]
    return total, n.int(), {"loss_stats": torch.stack(stats)}


def _forward_step(m: ModelConfig, data_iterator, model):
    b = next(data_iterator)
    bsz, s = b["shape"]
    dev = _device()
    mask = batch_mask(m, (bsz, s), b.get("segment_ids"), b.get("prefix_end"), dev)
    tokens = b.get("tokens")
    pos = torch.arange(s, device=dev).unsqueeze(0).expand(bsz, s)
    out = model(tokens, pos, mask, labels=b.get("labels"))
    return out, partial(_loss_func, b.get("loss_mask"), b.get("objective"))


def forward_backward(state: TrainState, cfg: CGLabConfig, micro_batches: list[dict], forward_only: bool = False):
    """Run all micro-batches of one global step through the pipeline; returns Megatron's per-micro-batch stats
    (non-empty on the last stage only)."""
    m = cfg.model
    stage = [to_stage_batch(b, m) for b in micro_batches]
    bsz, s = stage[0]["shape"]
    fb = get_forward_backward_func()
    for chunk in state.model:
        chunk.zero_grad_buffer()
    # As Megatron's own train_step does: the fp32 optimizer's step leaves param.grad aliasing the DDP main grad, and
    # autograd would then add the next step's first micro-batch into it before DDP's hook adds it again (2 g1 + g2).
    state.optimizer.zero_grad()
    return fb(forward_step_func=partial(_forward_step, m), data_iterator=iter(stage), model=state.model,
              num_microbatches=len(stage), seq_length=s, micro_batch_size=bsz, decoder_seq_length=s,
              forward_only=forward_only)


def reduce_stats(stats: list[dict]) -> dict[str, float]:
    """Token-weighted loss (and loss per objective) over this step, agreed on by every rank."""
    import torch.distributed as dist

    width = 2 + 2 * len(OBJECTIVES)
    total = torch.zeros(width, dtype=torch.float64, device=_device())
    for st in stats:
        v = st["loss_stats"].double()
        total[: v.numel()] += v
    if parallel_state.is_pipeline_last_stage():
        dist.all_reduce(total, group=parallel_state.get_data_parallel_group())
    # the last stage holds the numbers; share them with the whole pipeline
    last = parallel_state.get_pipeline_model_parallel_last_rank()
    dist.broadcast(total, src=last, group=parallel_state.get_pipeline_model_parallel_group())
    out = {"loss": (total[0] / total[1].clamp(min=1)).item(), "loss_tokens": total[1].item()}
    for i, name in enumerate(OBJECTIVES):
        s, n = total[2 + 2 * i], total[3 + 2 * i]
        if n > 0:
            out[f"loss/{name}"] = (s / n).item()
    return out


def optimizer_step(state: TrainState):
    """Megatron's optimizer step (clip + update), with the deferred gradient factor when train.fold_grad_scale;
    returns (success, grad_norm)."""
    if state.grad_fold is None:
        ok, grad_norm, _ = state.optimizer.step()
    else:
        ok, grad_norm, _ = megatron_gradscale.step(state.optimizer, state.grad_fold)
    return ok, grad_norm


def train_step(state: TrainState, cfg: CGLabConfig, micro_batches: list[dict]) -> dict[str, float]:
    stats = forward_backward(state, cfg, micro_batches)
    ok, grad_norm = optimizer_step(state)
    state.scheduler.step(increment=1)
    out = reduce_stats(stats)
    out["grad_norm"] = float(grad_norm) if grad_norm is not None else math.nan
    out["lr"] = state.optimizer.param_groups[0]["lr"]
    out["update_ok"] = float(bool(ok))
    return out
