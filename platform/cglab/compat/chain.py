"""The Megatron optimizers a built optimizer is made of: `get_megatron_optimizer` returns a ChainedOptimizer (one
per parameter group kind) or, in older versions, one optimizer; every per-optimizer patch walks them the same way."""

from __future__ import annotations


def sub_optimizers(optimizer) -> list:
    return list(getattr(optimizer, "chained_optimizers", [optimizer]))
