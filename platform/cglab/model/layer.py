"""The GPT-J / CodeGen block as a Megatron-Core TransformerLayer: one LayerNorm feeding attention and MLP in parallel.

    x + attn(ln(x)) + mlp(ln(x))

Attention projections carry no bias (as in CodeGen); the MLP does. Everything else (TP-sharded linears, rotary,
core attention) comes from Megatron through the spec. `FusedSelfAttention` and `fused_residual=True` swap the
elementwise glue for the compiled kernels of `cglab.model.fused`; the GEMMs and their parallelism are unchanged.
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import torch.nn.functional as F
from megatron.core import tensor_parallel
from megatron.core.transformer.attention import SelfAttention
from megatron.core.transformer.transformer_layer import TransformerLayer
from torch import Tensor

from cglab.model import fused


class NoBiasSelfAttention(SelfAttention):
    """SelfAttention whose qkv and output projections have no bias, while the rest of the model keeps its biases."""

    def __init__(self, config, *args, **kwargs):
        # bias_activation_fusion is an MLP setting whose config check demands add_bias_linear.
        config = dataclasses.replace(config, add_bias_linear=False, add_qkv_bias=False, bias_activation_fusion=False)
        super().__init__(config, *args, **kwargs)


# Arguments that take Megatron's general path (inference, packed sequences, precomputed cos/sin, biases).
_GENERAL_PATH_ARGS = (
    "key_value_states",
    "inference_context",
    "inference_params",
    "packed_seq_params",
    "attention_bias",
    "rotary_pos_cos",
    "rotary_pos_sin",
    "rotary_pos_cos_sin",
)


class FusedSelfAttention(NoBiasSelfAttention):
    """Training forward as qkv GEMM -> one fused split + rotary + layout kernel -> SDPA -> output GEMM.
    Needs the SDPA core attention and as many key/value heads as query heads (CodeGen's layout)."""

    def __init__(self, config, *args, **kwargs):
        super().__init__(config, *args, **kwargs)
        assert hasattr(self.core_attention, "attend"), "FusedSelfAttention needs the sdpa core attention"
        assert self.num_query_groups_per_partition == self.num_attention_heads_per_partition, "no GQA in CodeGen"

    def forward(self, hidden_states, attention_mask, **kwargs):
        freqs = kwargs.get("rotary_pos_emb")
        if freqs is None or any(kwargs.get(k) is not None for k in _GENERAL_PATH_ARGS):
            return super().forward(hidden_states, attention_mask, **kwargs)
        if isinstance(freqs, tuple):  # (query, key) frequencies: the same tensor for self-attention
            freqs = freqs[0]
        mixed, _ = self.linear_qkv(hidden_states)
        q, k, v = fused.qkv_rope(
            mixed, freqs, self.num_attention_heads_per_partition, self.hidden_size_per_attention_head
        )
        if self.checkpoint_core_attention and self.training:  # selective recompute, as Megatron's own path does
            # the mask rides in the closure: Megatron's checkpoint saves its arguments as tensors, which a
            # FlexAttention BlockMask is not
            attend = lambda q, k, v: self.core_attention.attend(q, k, v, attention_mask)  # noqa: E731
            return self.linear_proj(tensor_parallel.checkpoint(attend, False, q, k, v))
        return self.linear_proj(self.core_attention.attend(q, k, v, attention_mask))


class _Branches(NamedTuple):
    """What the attention half hands the MLP half: in a parallel block the MLP reads the layer's normed input,
    not the attention's output, so both travel together between Megatron's two hooks."""

    residual: Tensor
    ln: Tensor
    attn: Tensor
    attn_bias: Tensor | None


class ParallelResidualLayer(TransformerLayer):
    """Megatron's TransformerLayer with its two narrow hooks overridden (its `forward` is kept: it calls
    `_forward_attention`, then `_forward_mlp` on what that returned): the attention hook runs the shared LayerNorm
    and attention, the MLP hook the MLP on the same normed input and the parallel residual sum."""

    def __init__(self, *args, fused_residual: bool = False, **kwargs):
        super().__init__(*args, **kwargs)
        self.fused_residual = fused_residual

    def _forward_attention(
        self,
        hidden_states,
        attention_mask=None,
        context=None,
        context_mask=None,
        rotary_pos_emb=None,
        rotary_pos_cos=None,
        rotary_pos_sin=None,
        rotary_pos_cos_sin=None,
        attention_bias=None,
        inference_context=None,
        packed_seq_params=None,
        sequence_len_offset=None,
        padding_mask=None,
        *,
        inference_params=None,
        **kwargs,
    ):
        # Megatron's signature (0.16.1), so its forward's positional arguments land where they do there. Its block
        # and callers pass more than this layer implements (padding_mask for MoE routing, rotary_pos_cos_sin for
        # fused inference rotary, the deprecated inference_params, cross-attention's context_mask, ...). None, the
        # training default, is harmless; a value would be dropped without a word and the layer would compute
        # something else than asked, so it is refused by name.
        unused = {
            "context_mask": context_mask,
            "rotary_pos_cos_sin": rotary_pos_cos_sin,
            "padding_mask": padding_mask,
            "inference_params": inference_params,
        }
        unhandled = sorted(k for k, v in {**kwargs, **unused}.items() if v is not None)
        if unhandled:
            raise TypeError(
                f"ParallelResidualLayer.forward does not implement {', '.join(unhandled)} (got a "
                "non-None value); it takes hidden_states, attention_mask, rotary_pos_emb/cos/sin, "
                "attention_bias, inference_context, packed_seq_params and sequence_len_offset"
            )
        ln = self.input_layernorm(hidden_states)
        attn, attn_bias = self.self_attention(
            ln,
            attention_mask=attention_mask,
            inference_context=inference_context,
            rotary_pos_emb=rotary_pos_emb,
            rotary_pos_cos=rotary_pos_cos,
            rotary_pos_sin=rotary_pos_sin,
            attention_bias=attention_bias,
            packed_seq_params=packed_seq_params,
            sequence_len_offset=sequence_len_offset,
        )
        return _Branches(hidden_states, ln, attn, attn_bias), context

    def _forward_mlp(self, branches: _Branches, inference_context=None, padding_mask=None):
        # padding_mask: refused by _forward_attention when set (Megatron's forward hands it to both hooks)
        hidden_states, ln, attn, attn_bias = branches
        mlp, mlp_bias = self.mlp(ln)
        if self.fused_residual and attn_bias is None and (self.hidden_dropout == 0.0 or not self.training):
            return fused.residual_sum(hidden_states, attn, mlp, mlp_bias)
        if attn_bias is not None:
            attn = attn + attn_bias
        if mlp_bias is not None:
            mlp = mlp + mlp_bias
        return hidden_states + F.dropout(attn + mlp, p=self.hidden_dropout, training=self.training)
