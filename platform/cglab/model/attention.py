"""Core attention through torch.nn.functional.scaled_dot_product_attention (flash / cuDNN / efficient kernels).

A drop-in for Megatron's DotProductAttention in a layer spec: same constructor and forward signature, inputs
[s, b, heads_per_partition, head_dim], output [s, b, heads_per_partition * head_dim]. `attend` takes q, k, v already
in SDPA's [b, heads, s, head_dim] layout (the fused qkv + rotary path produces them that way).
"""

from __future__ import annotations

import contextlib

import torch.nn.functional as F
from megatron.core.transformer.module import MegatronModule
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.nn.attention.flex_attention import BlockMask, flex_attention

from cglab.model.fused import on_device

# model.sdpa_kernel -> SDPA backends in priority order: the named one first, then the rest; every backend stays
# enabled, so a kernel that cannot take a call (a head size, a mask) falls through to the next instead of failing
_ORDER = [SDPBackend.FLASH_ATTENTION, SDPBackend.CUDNN_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]
KERNEL_PRIORITY = {
    name: [first] + [b for b in _ORDER if b != first]
    for name, first in (
        ("cudnn", SDPBackend.CUDNN_ATTENTION),
        ("flash", SDPBackend.FLASH_ATTENTION),
        ("efficient", SDPBackend.EFFICIENT_ATTENTION),
    )
}


class SDPAttention(MegatronModule):
    def __init__(
        self,
        config,
        layer_number: int,
        attn_mask_type,
        attention_type: str,
        attention_dropout: float | None = None,
        softmax_scale: float | None = None,
        cp_comm_type=None,
        pg_collection=None,
        kernel: str = "auto",
    ):
        super().__init__(config=config)
        self.dropout = config.attention_dropout if attention_dropout is None else attention_dropout
        self.softmax_scale = softmax_scale  # None: 1/sqrt(head_dim), as CodeGen
        self.priority = KERNEL_PRIORITY.get(kernel)  # None: torch's own order

    def _kernels(self):
        return sdpa_kernel(self.priority, set_priority=True) if self.priority else contextlib.nullcontext()

    def forward(
        self, query, key, value, attention_mask, attn_mask_type=None, attention_bias=None, packed_seq_params=None
    ):
        assert packed_seq_params is None and attention_bias is None
        return self.attend(*(t.permute(1, 2, 0, 3) for t in (query, key, value)), attention_mask)

    def attend(self, q, k, v, attention_mask):
        """q, k, v [b, heads, s, head_dim]; attention_mask None (causal), a FlexAttention BlockMask, or bool
        [b|1, 1, s, s] with True = hidden. Returns [s, b, heads * head_dim]."""
        p = self.dropout if self.training else 0.0
        if isinstance(attention_mask, BlockMask):
            # a template torch.compile turns into one Triton kernel; eager FlexAttention is a dense reference
            out = on_device(flex_attention, q)(q, k, v, block_mask=attention_mask, scale=self.softmax_scale)
        elif attention_mask is None:  # pure causal: lets SDPA pick a fused (flash / cuDNN) kernel
            with self._kernels():
                out = F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=p, scale=self.softmax_scale)
        else:
            with self._kernels():
                out = F.scaled_dot_product_attention(
                    q, k, v, attn_mask=~attention_mask, dropout_p=p, scale=self.softmax_scale
                )
        b, np_, sq, hn = out.shape
        return out.permute(2, 0, 1, 3).reshape(sq, b, np_ * hn)
