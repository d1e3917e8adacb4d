"""Layer specs for the CodeGen block, one per attention backend. Extending the model means editing a spec, not
Megatron."""

from __future__ import annotations

import torch
from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear
from megatron.core.transformer.attention import SelfAttentionSubmodules
from megatron.core.transformer.dot_product_attention import DotProductAttention
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.identity_op import IdentityOp
from megatron.core.transformer.mlp import MLP, MLPSubmodules
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_block import TransformerBlockSubmodules
from megatron.core.transformer.transformer_config import TransformerConfig
from megatron.core.transformer.transformer_layer import TransformerLayerSubmodules

from cglab.model.attention import SDPAttention
from cglab.model.layer import FusedSelfAttention, NoBiasSelfAttention, ParallelResidualLayer


class TorchLayerNorm:
    """torch's LayerNorm as Megatron's WrappedTorchNorm builds it, also under sequence parallelism, which
    WrappedTorchNorm refuses: a layer norm is per token, so on a sequence shard it is the same maths; only its
    weight and bias gradients are partial sums over the TP ranks' shards, which `finalize_model_grads` all-reduces
    over TP for parameters marked `sequence_parallel` (as Megatron's Apex and TE norms mark theirs)."""

    def __new__(cls, config: TransformerConfig, hidden_size: int, eps: float = 1e-5, **_unused):
        norm = torch.nn.LayerNorm(normalized_shape=hidden_size, eps=eps)
        for param in norm.parameters():
            param.sequence_parallel = config.sequence_parallel
        return norm


def codegen_block_spec(layer: ModuleSpec, num_layers: int) -> TransformerBlockSubmodules:
    """A pipeline stage of `num_layers` layers and, after them, the final layer norm of the layers' own kind
    (Megatron's default for a layer spec is WrappedTorchNorm without Apex or TE, which refuses sequence
    parallelism)."""
    return TransformerBlockSubmodules(layer_specs=[layer] * num_layers, layer_norm=layer.submodules.input_layernorm)


def codegen_layer_spec(backend: str, compile_fusions: bool = False, sdpa_kernel: str = "auto") -> ModuleSpec:
    """backend: a resolved attention backend (local | sdpa | flex | te; cglab.decisions resolves "auto").
    compile_fusions: with the sdpa or flex backend, the fused qkv + rotary attention and the one-pass residual sum
    (cglab.model.fused); TE brings its own fusions. sdpa_kernel: the SDPA kernel tried first (sdpa and flex)."""
    if backend not in ("local", "sdpa", "flex", "te"):
        raise ValueError(
            f"codegen_layer_spec: {backend!r} is not a resolved attention backend "
            "(cglab.decisions.ModelDecisions resolves model.attention_backend)"
        )
    fuse = compile_fusions and backend in ("sdpa", "flex")
    if backend == "te":
        # Transformer Engine: optional (not installed on CPU machines), imported only when its backend is chosen
        from megatron.core.extensions.transformer_engine import (
            TEColumnParallelLinear,
            TEDotProductAttention,
            TENorm,
            TERowParallelLinear,
        )

        norm, col, row, core = TENorm, TEColumnParallelLinear, TERowParallelLinear, TEDotProductAttention
    else:
        norm, col, row = TorchLayerNorm, ColumnParallelLinear, RowParallelLinear
        if backend in ("sdpa", "flex"):  # flex: the same module, handed FlexAttention block masks
            core = ModuleSpec(module=SDPAttention, params={"kernel": sdpa_kernel})
        else:
            core = DotProductAttention
    return ModuleSpec(
        module=ParallelResidualLayer,
        params={"fused_residual": fuse},
        submodules=TransformerLayerSubmodules(
            input_layernorm=norm,
            self_attention=ModuleSpec(
                module=FusedSelfAttention if fuse else NoBiasSelfAttention,
                params={"attn_mask_type": AttnMaskType.causal},
                submodules=SelfAttentionSubmodules(
                    linear_qkv=col, core_attention=core, linear_proj=row, q_layernorm=IdentityOp, k_layernorm=IdentityOp
                ),
            ),
            pre_mlp_layernorm=IdentityOp,  # the single input_layernorm feeds the MLP too
            mlp=ModuleSpec(module=MLP, submodules=MLPSubmodules(linear_fc1=col, linear_fc2=row)),
        ),
    )
