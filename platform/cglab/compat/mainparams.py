"""The fp32 main ("master") copy that Megatron-Core's mixed-precision optimizers keep of each bf16/fp16 parameter,
set from values of full precision.

Megatron builds that copy from the bf16 parameters (`param.detach().clone().float()` in
Float16OptimizerWithFloat16Params; this data-parallel rank's flat shard of it in DistributedOptimizer), so weights
loaded from an fp32 source (`model.init_from`) would start the optimizer's copy rounded to bf16. `seed` overwrites
it with the source's values; the bf16 parameters stay what they are, the rounding of those values (as Megatron's own
main -> model copy makes them). Megatron's `reload_model_params(state_dict)` does this for DistributedOptimizer
only (Float16OptimizerWithFloat16Params asserts state_dict is None) and matches names by substring, hence this
module. The attributes read are listed in `registry.PATCHES`.
"""

from __future__ import annotations

from typing import Iterator, Mapping

import torch

from cglab.compat.chain import sub_optimizers


def _main_params(opt) -> Iterator[tuple[torch.nn.Parameter, torch.Tensor, slice | None]]:
    """(model param, its fp32 main param, the main param's part of the flattened model param or None: all of it)."""
    if hasattr(opt, "shard_fp32_from_float16_groups"):  # DistributedOptimizer: this DP rank's shard
        for models, mains in zip(opt.model_float16_groups, opt.shard_fp32_from_float16_groups):
            for param, main in zip(models, mains):
                r = opt._get_model_param_range_map(param)["param"]
                yield param, main, slice(r.start, r.end)
    else:  # Float16OptimizerWithFloat16Params; an FP32Optimizer has neither group: its params are their own main
        for models, mains in zip(getattr(opt, "float16_groups", ()), getattr(opt, "fp32_from_float16_groups", ())):
            for param, main in zip(models, mains):
                yield param, main, None


@torch.no_grad()
def seed(optimizer, values: Mapping[torch.nn.Parameter, torch.Tensor]) -> int:
    """Set the main param of every bf16/fp16 model param of `optimizer` (a built Megatron optimizer, chained or
    not) to `values[param]`, a tensor of the param's shape; returns how many were set (0 in an fp32 run). A
    param without a value is a KeyError: a main copy left rounded would go unnoticed."""
    n = 0
    for opt in sub_optimizers(optimizer):
        for param, main, part in _main_params(opt):
            if param not in values:
                raise KeyError(f"no full-precision value for a {tuple(param.shape)} {param.dtype} parameter")
            value = values[param]
            if value.shape != param.shape:
                raise ValueError(f"a value of shape {tuple(value.shape)} for a parameter of {tuple(param.shape)}")
            value = value.to(device=main.device, dtype=torch.float32)
            main.copy_(value if part is None else value.reshape(-1)[part])
            n += 1
    return n
