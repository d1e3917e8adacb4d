"""The GPT-J / CodeGen block as a Megatron-Core TransformerLayer: one LayerNorm feeding attention and MLP in parallel.

    x + attn(ln(x)) + mlp(ln(x))

Attention projections carry no bias (as in CodeGen); the MLP does. Everything else (TP-sharded linears, rotary,
core attention) comes from Megatron through the spec.
"""
from __future__ import annotations

import dataclasses

import torch.nn.functional as F
from megatron.core.transformer.attention import SelfAttention
from megatron.core.transformer.transformer_layer import TransformerLayer


class NoBiasSelfAttention(SelfAttention):
    """SelfAttention whose qkv and output projections have no bias, while the rest of the model keeps its biases."""

    def __init__(self, config, *args, **kwargs):
        # bias_activation_fusion is an MLP setting whose config check demands add_bias_linear.
        config = dataclasses.replace(config, add_bias_linear=False, add_qkv_bias=False, bias_activation_fusion=False)
        super().__init__(config, *args, **kwargs)


class ParallelResidualLayer(TransformerLayer):
    def forward(self, hidden_states, attention_mask=None, context=None, context_mask=None, rotary_pos_emb=None,
                rotary_pos_cos=None, rotary_pos_sin=None, attention_bias=None, inference_context=None,
                packed_seq_params=None, sequence_len_offset=None, **kwargs):
        ln = self.input_layernorm(hidden_states)
        attn, attn_bias = self.self_attention(
            ln, attention_mask=attention_mask, inference_context=inference_context,
            rotary_pos_emb=rotary_pos_emb, rotary_pos_cos=rotary_pos_cos, rotary_pos_sin=rotary_pos_sin,
            attention_bias=attention_bias, packed_seq_params=packed_seq_params,
            sequence_len_offset=sequence_len_offset)
        mlp, mlp_bias = self.mlp(ln)
        if attn_bias is not None:
            attn = attn + attn_bias
        if mlp_bias is not None:
            mlp = mlp + mlp_bias
        out = hidden_states + F.dropout(attn + mlp, p=self.hidden_dropout, training=self.training)
        return out, context
