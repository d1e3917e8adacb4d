"""Which Adam Megatron-Core builds, and torch's fused AdamW kernel in place of Megatron's foreach default.

Megatron-Core 0.16.1 decides its Adam class when `megatron.core.optimizer` is imported: Transformer Engine's
FusedAdam when TE imports, else Apex's, else torch's AdamW, which it builds in foreach mode. `use_fused_adam` flips
the param groups of a built torch AdamW to the fused CUDA kernel (one launch per step, and the only kernel that
takes the grad scale cglab.compat.gradscale folds into it).
"""

from __future__ import annotations

import torch

from cglab.compat.chain import sub_optimizers


def megatron_adam_impl() -> str:
    """The Adam Megatron-Core 0.16.1 will build in this process: "te", "apex" or "torch" (AdamW)."""
    # Megatron (seconds to import): loaded when a patch runs, not when cglab.decisions imports compat
    from megatron.core import optimizer as mo

    if mo.USING_PYTORCH_OPTIMIZER:
        return "torch"
    return "te" if mo.Adam.__module__.startswith("transformer_engine") else "apex"


def built_adam(optimizer) -> str:
    """The implementation of the Adam Megatron actually built (what the fold decision must rest on)."""
    impls = {
        _adam_impl(type(opt.optimizer))
        for opt in sub_optimizers(optimizer)
        if getattr(opt, "optimizer", None) is not None
    }
    return "torch" if impls <= {"torch"} else sorted(impls - {"torch"})[0]


def _adam_impl(cls) -> str:
    mod = cls.__module__
    return "te" if mod.startswith("transformer_engine") else "apex" if mod.startswith("apex") else "torch"


def use_fused_adam(optimizer) -> None:
    """Without Apex/TE, Megatron falls back to torch AdamW in its foreach mode; the fused CUDA kernel is one launch.
    Undo: set each param group's "fused" back to False and "foreach" to True."""
    for opt in sub_optimizers(optimizer):
        inner = getattr(opt, "optimizer", None)
        if isinstance(inner, torch.optim.AdamW | torch.optim.Adam):
            for group in inner.param_groups:
                group["fused"], group["foreach"] = True, False
