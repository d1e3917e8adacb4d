"""Megatron-Core's per-token gradient scaling and the grad-norm clip, applied inside torch's fused AdamW kernel.

With `calculate_per_token_loss`, `finalize_model_grads` multiplies every fp32 main grad by 1/num_tokens (a pass
over the grads), and the clip multiplies them by max_norm/norm when that is < 1 (another). Both are one scalar
per step, and fused AdamW already takes one: `grad_scale`, by which the kernel divides each grad as it reads it.
`install` makes the DDP chunks record the 1/num_tokens factor instead of applying it; `step` is Megatron's
optimizer step with the norm taken on the raw grads, rescaled, and both factors handed to the kernel. The
update, the returned grad norm and the grads left behind equal Megatron's own (up to fp32 rounding).
"""

from __future__ import annotations

import torch

from cglab.compat.chain import sub_optimizers


class GradFold:
    """The gradient factor Megatron asked for since the last optimizer step (None: none)."""

    def __init__(self):
        self.factor: torch.Tensor | float | None = None

    def defer(self, scaling) -> None:
        """Stands in for `DistributedDataParallel.scale_gradients`."""
        self.factor = scaling if self.factor is None else self.factor * scaling

    def take(self):
        factor, self.factor = self.factor, None
        return 1.0 if factor is None else factor


def install(model_chunks, optimizer) -> GradFold:
    """Defer the chunks' gradient scaling to `step`. Every inner optimizer must be torch Adam/AdamW with
    fused=True (the only kernel that takes a grad scale)."""
    for opt in sub_optimizers(optimizer):
        inner = opt.optimizer
        if not (
            isinstance(inner, torch.optim.Adam | torch.optim.AdamW) and all(g.get("fused") for g in inner.param_groups)
        ):
            raise ValueError(
                f"train.fold_grad_scale: needs torch's fused Adam/AdamW, got {type(inner).__name__} "
                f"(fused={[g.get('fused') for g in inner.param_groups]})"
            )
    fold = GradFold()
    for chunk in model_chunks:
        chunk.scale_gradients = fold.defer  # instance attribute: shadows the method for this chunk only
    return fold


@torch.no_grad()
def step(optimizer, fold: GradFold):
    """`optimizer.step()` for a Megatron optimizer whose grads still lack `fold`'s factor; returns the same
    (success, grad_norm, num_zeros) triple, with grad_norm that of the scaled grads."""
    factor = fold.take()
    if optimizer.prepare_grads():
        return False, None, None
    grad_norm = optimizer.get_grad_norm() * factor
    coef = factor
    clip = optimizer.config.clip_grad
    if clip > 0.0:
        # Megatron's clip_grad_by_total_norm_fp32: scale by max_norm / (norm + 1e-6) when that is below 1.
        coef = coef * torch.clamp(torch.as_tensor(clip / (grad_norm + 1.0e-6)), max=1.0)
    scale = (1.0 / torch.as_tensor(coef, dtype=torch.float32)).reshape(())  # the kernel divides by it
    inners = [opt.optimizer for opt in sub_optimizers(optimizer) if opt.get_parameters()]
    for inner in inners:
        inner.grad_scale = scale.to(inner.param_groups[0]["params"][0].device)  # no copy when already there
    try:
        ok = optimizer.step_with_ready_grads()
    finally:
        for inner in inners:
            inner.__dict__.pop("grad_scale", None)
    return ok, grad_norm, None
