"""Core attention through torch.nn.functional.scaled_dot_product_attention (flash / cuDNN / efficient kernels).

A drop-in for Megatron's DotProductAttention in a layer spec: same constructor and forward signature, inputs
[s, b, heads_per_partition, head_dim], output [s, b, heads_per_partition * head_dim].
"""
from __future__ import annotations

import torch.nn.functional as F
from megatron.core.transformer.module import MegatronModule


class SDPAttention(MegatronModule):
    def __init__(self, config, layer_number: int, attn_mask_type, attention_type: str,
                 attention_dropout: float | None = None, softmax_scale: float | None = None,
                 cp_comm_type=None, pg_collection=None):
        super().__init__(config=config)
        self.dropout = config.attention_dropout if attention_dropout is None else attention_dropout
        self.softmax_scale = softmax_scale  # None: 1/sqrt(head_dim), as CodeGen

    def forward(self, query, key, value, attention_mask, attn_mask_type=None, attention_bias=None,
                packed_seq_params=None):
        assert packed_seq_params is None and attention_bias is None
        sq, b, np_, hn = query.shape
        q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))
        p = self.dropout if self.training else 0.0
        if attention_mask is None:  # pure causal: lets SDPA pick the flash kernel
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=p, scale=self.softmax_scale)
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=~attention_mask, dropout_p=p,
                                                 scale=self.softmax_scale)
        return out.permute(2, 0, 1, 3).reshape(sq, b, np_ * hn)
