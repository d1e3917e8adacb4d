"""Initialisation that does not depend on the parallel layout: the same seed gives the same model at any TP x PP.

Every parameter's full tensor is drawn from its own generator, seeded by (seed, parameter's global name), and each
rank keeps its slice. So a TP=2 or PP=2 run starts from exactly the weights of the TP=1 run, and ablations that
change the layout change nothing else. Init rules follow Megatron/GPT-2: normal(0, std) for weights, std/sqrt(2L) for
the projections that write into the residual stream, ones and zeros for LayerNorm, zeros for biases.
"""

from __future__ import annotations

import math
import zlib

import torch

from cglab.config import ModelConfig
from cglab.model.hf_convert import _LAYER, _split_dim

_RESIDUAL_OUT = ("linear_proj.weight", "linear_fc2.weight")


def _global_name(local: str, layer_offset: int) -> str:
    mt = _LAYER.match(local)
    return f"decoder.layers.{int(mt.group(1)) + layer_offset}.{mt.group(2)}" if mt else local


@torch.no_grad()
def init_weights(
    model: torch.nn.Module, m: ModelConfig, seed: int, tp_rank: int, tp_size: int, layer_offset: int = 0
) -> None:
    """layer_offset: the global index of this pipeline stage's first layer (`hf_convert.stage_offsets`)."""
    for local, p in model.named_parameters():
        name = _global_name(local, layer_offset)
        dim = _split_dim(name)
        shape = list(p.shape)
        if dim is not None:
            shape[dim] *= tp_size
        if "layernorm" in name and name.endswith("weight"):
            full = torch.ones(shape)
        elif name.endswith("bias"):
            full = torch.zeros(shape)
        else:
            std = m.init_method_std / (math.sqrt(2 * m.num_layers) if name.endswith(_RESIDUAL_OUT) else 1)
            gen = torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()))
            full = torch.empty(shape).normal_(0.0, std, generator=gen)
        part = full.chunk(tp_size, dim=dim)[tp_rank] if dim is not None else full
        p.copy_(part.to(p.device, p.dtype))
