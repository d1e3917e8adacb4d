"""Layer specs for the CodeGen block, one per attention backend. Extending the model means editing a spec, not Megatron."""
from __future__ import annotations

import functools
import importlib.util

import torch
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.identity_op import IdentityOp
from megatron.core.transformer.mlp import MLP, MLPSubmodules
from megatron.core.transformer.attention import SelfAttentionSubmodules
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_layer import TransformerLayerSubmodules

from cglab.model.layer import FusedSelfAttention, NoBiasSelfAttention, ParallelResidualLayer


@functools.cache  # batch_mask resolves the backend every micro-batch; a module search each time is wasted
def have_te() -> bool:
    return importlib.util.find_spec("transformer_engine") is not None


def choose_backend(backend: str, attention_dropout: float = 0.0, cuda: bool | None = None) -> tuple[str, str]:
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
    if attention_dropout == 0:
        return "flex", "auto on GPU: FlexAttention block masks (measured; Transformer Engine is never chosen by auto)"
    return "sdpa", "auto on GPU with model.attention_dropout > 0, which FlexAttention lacks: SDPA with dense masks"


def resolve_backend(backend: str, attention_dropout: float = 0.0, cuda: bool | None = None) -> str:
    """auto -> flex (GPU, no attention dropout) | sdpa (otherwise); see choose_backend."""
    return choose_backend(backend, attention_dropout, cuda)[0]


def codegen_layer_spec(backend: str = "auto", compile_fusions: bool = False,
                       sdpa_kernel: str = "auto") -> ModuleSpec:
    """compile_fusions: with the sdpa or flex backend, the fused qkv + rotary attention and the one-pass residual sum
    (cglab.model.fused); TE brings its own fusions. sdpa_kernel: the SDPA kernel tried first (sdpa and flex)."""
    backend = resolve_backend(backend)
    fuse = compile_fusions and backend in ("sdpa", "flex")
    if backend == "te":
        from megatron.core.extensions.transformer_engine import (
            TEColumnParallelLinear, TEDotProductAttention, TENorm, TERowParallelLinear)
        norm, col, row, core = TENorm, TEColumnParallelLinear, TERowParallelLinear, TEDotProductAttention
    else:
        from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear
        from megatron.core.transformer.torch_norm import WrappedTorchNorm
        norm, col, row = WrappedTorchNorm, ColumnParallelLinear, RowParallelLinear
        if backend in ("sdpa", "flex"):  # flex: the same module, handed FlexAttention block masks
            from cglab.model.attention import SDPAttention
            core = ModuleSpec(module=SDPAttention, params={"kernel": sdpa_kernel})
        else:
            from megatron.core.transformer.dot_product_attention import DotProductAttention as core
    return ModuleSpec(
        module=ParallelResidualLayer,
        params={"fused_residual": fuse},
        submodules=TransformerLayerSubmodules(
            input_layernorm=norm,
            self_attention=ModuleSpec(
                module=FusedSelfAttention if fuse else NoBiasSelfAttention,
                params={"attn_mask_type": AttnMaskType.causal},
                submodules=SelfAttentionSubmodules(linear_qkv=col, core_attention=core, linear_proj=row,
                                                   q_layernorm=IdentityOp, k_layernorm=IdentityOp),
            ),
            pre_mlp_layernorm=IdentityOp,  # the single input_layernorm feeds the MLP too
            mlp=ModuleSpec(module=MLP, submodules=MLPSubmodules(linear_fc1=col, linear_fc2=row)),
        ),
    )
