"""One training step on Megatron-Core: model + DDP + optimizer + LR schedule, forward/backward through Megatron's
pipeline schedules, token-weighted loss across micro-batches and data-parallel ranks.

Losses are summed per token (`calculate_per_token_loss`) and Megatron's `finalize_model_grads` divides the
gradients by the number of loss tokens of the whole global batch, so TP, PP, DP and gradient accumulation all give
the loss of the same token-weighted mean.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from functools import partial

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
from megatron.core.distributed.finalize_model_grads import finalize_model_grads
from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler
from megatron.core.pipeline_parallel import get_forward_backward_func
from megatron.core.transformer.module import Float16Module

from cglab import compat
from cglab.compat.adam import built_adam
from cglab.compat.gradscale import GradFold
from cglab.compat.gradscale import step as folded_step
from cglab.config import CGLabConfig, ModelConfig
from cglab.data.contract import OBJECTIVES  # index = a sample's `objective` code
from cglab.decisions import RunDecisions
from cglab.model.codegen import batch_mask, build_model
from cglab.train import pretrained

log = logging.getLogger(__name__)


@dataclass
class TrainState:
    model: list[torch.nn.Module]  # one chunk per rank (no virtual pipeline)
    optimizer: object
    scheduler: OptimizerParamScheduler
    decisions: RunDecisions  # made once in build_train_state; every micro-batch and step reads them here
    grad_fold: GradFold | None = None  # train.fold_grad_scale: the deferred 1/tokens factor


def build_train_state(
    cfg: CGLabConfig, lr_decay_steps: int | None = None, decisions: RunDecisions | None = None
) -> TrainState:
    """decisions: the run's, resolved once (None: for cfg on this machine, here); a refused one raises ConfigError
    before anything is built."""
    d = (decisions or RunDecisions.resolve(cfg)).require()
    log.info("run decisions: %s", d.plan_sections(cfg))
    bf16 = cfg.train.precision == "bf16"
    model = build_model(cfg.model, cfg.parallel, bf16=bf16, seed=cfg.train.seed, decisions=d.model)
    # model.init_from, before DDP and the optimizer see the params; in fp32 as the source holds them, which a bf16
    # run keeps for the optimizer's main params (an fp32 run's params are their own: nothing to keep)
    full = pretrained.load_weights(model, cfg)
    if not bf16:
        full = {}
    named = dict(model.named_parameters())  # the names load_weights returns, before the wrappers prefix them
    tc = model.config
    tc.calculate_per_token_loss = True
    tc.finalize_model_grads_func = finalize_model_grads
    if bf16:
        model = Float16Module(tc, model)
    ddp_cfg = DistributedDataParallelConfig(
        grad_reduce_in_fp32=True,
        overlap_grad_reduce=False,
        use_distributed_optimizer=cfg.parallel.use_distributed_optimizer,
    )
    model = DistributedDataParallel(tc, ddp_cfg, model)
    t = cfg.train
    opt_cfg = OptimizerConfig(
        optimizer="adam",
        lr=t.lr,
        min_lr=t.min_lr,
        weight_decay=t.weight_decay,
        adam_beta1=t.adam_beta1,
        adam_beta2=t.adam_beta2,
        clip_grad=t.grad_clip,
        bf16=bf16,
        params_dtype=tc.params_dtype,
        use_distributed_optimizer=cfg.parallel.use_distributed_optimizer,
    )
    compat.apply("foreach")  # without Apex/TE, Megatron's per-tensor loops sync the device once per parameter
    optimizer = get_megatron_optimizer(opt_cfg, [model])
    if full:  # Megatron built the fp32 main params from the bf16 params: start them from the weights' own values
        compat.seed_main_params(optimizer, {param: full[name] for name, param in named.items()})
        del full
    plan = d.adam
    built = built_adam(optimizer)
    if built != plan.impl:  # the fold decision rests on the Adam Megatron builds; it must be the one decided on
        raise RuntimeError(
            f"Megatron-Core built {built}'s Adam, the run decided for {plan.impl}'s "
            "(cglab.compat.adam.megatron_adam_impl no longer predicts it)"
        )
    fold = compat.apply_to_optimizer([model], optimizer, fused_adam=plan.fused and plan.impl == "torch", fold=plan.fold)
    decay = lr_decay_steps or t.train_steps
    scheduler = OptimizerParamScheduler(
        optimizer,
        init_lr=0.0 if t.warmup_steps else t.lr,
        max_lr=t.lr,
        min_lr=t.min_lr,
        lr_warmup_steps=t.warmup_steps,
        lr_decay_steps=max(decay, t.warmup_steps + 1),
        lr_decay_style="cosine",
        start_wd=t.weight_decay,
        end_wd=t.weight_decay,
        wd_incr_steps=decay,
        wd_incr_style="constant",
    )
    return TrainState([model], optimizer, scheduler, d, fold)


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


def _forward_step(m: ModelConfig, backend: str, data_iterator, model):
    b = next(data_iterator)
    bsz, s = b["shape"]
    dev = _device()
    mask = batch_mask(m, (bsz, s), b.get("segment_ids"), b.get("prefix_end"), dev, backend)
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
    backend = state.decisions.model.attention_backend
    return fb(
        forward_step_func=partial(_forward_step, m, backend),
        data_iterator=iter(stage),
        model=state.model,
        num_microbatches=len(stage),
        seq_length=s,
        micro_batch_size=bsz,
        decoder_seq_length=s,
        forward_only=forward_only,
    )


def reduce_stats(stats: list[dict]) -> dict[str, float]:
    """Token-weighted loss (and loss per objective) over this step, agreed on by every rank."""
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
        ok, grad_norm, _ = folded_step(state.optimizer, state.grad_fold)
    return ok, grad_norm


def train_step(
    state: TrainState, cfg: CGLabConfig, micro_batches: list[dict], lr_progress: float = 1.0
) -> dict[str, float]:
    """One optimizer step. lr_progress: how far the LR schedule advances, in nominal steps (1; with a token budget
    train.train_steps x this step's tokens / budget, so the schedule ends at the budget: DataFeed.progress)."""
    stats = forward_backward(state, cfg, micro_batches)
    ok, grad_norm = optimizer_step(state)
    state.scheduler.step(increment=lr_progress)
    out = reduce_stats(stats)
    out["grad_norm"] = float(grad_norm) if grad_norm is not None else math.nan
    out["lr"] = state.optimizer.param_groups[0]["lr"]
    out["update_ok"] = float(bool(ok))
    return out
