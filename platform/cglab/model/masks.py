"""Attention masks for packed CodeGen2 batches: causal, prefix-LM and per-document.

Convention (Megatron's): a boolean tensor [b, 1, s, s] where True means "may NOT attend".
"""
from __future__ import annotations

import torch


def allowed(segment_ids: torch.Tensor | None, prefix_len: torch.Tensor | None, seq_len: int,
            batch: int, device=None) -> torch.Tensor:
    """Boolean [b, s, s], True where query q may attend key k.

    Causal everywhere; keys inside a sample's prefix (k < prefix_len) are visible to every query, which makes the
    prefix bidirectional and changes nothing after it; with segment_ids, only keys of the query's own document.
    """
    idx = torch.arange(seq_len, device=device)
    ok = (idx[None, :] <= idx[:, None]).expand(batch, seq_len, seq_len)
    if prefix_len is not None:
        in_prefix = idx[None, None, :] < prefix_len.to(device).view(-1, 1, 1)
        ok = ok | in_prefix
    if segment_ids is not None:
        seg = segment_ids.to(device)
        ok = ok & (seg[:, :, None] == seg[:, None, :])
    return ok


def block_mask(segment_ids: torch.Tensor | None, prefix_len: torch.Tensor | None, *, seq_len: int, batch: int,
               device=None):
    """The pairs of `allowed` as a FlexAttention BlockMask: no dense [s, s] tensor reaches the kernel, and blocks
    with nothing visible (other documents, the future) are skipped rather than computed and masked."""
    from torch.nn.attention.flex_attention import create_block_mask

    device = torch.device(device or "cpu")
    seg = segment_ids.to(device) if segment_ids is not None else None
    pre = prefix_len.to(device).long().view(-1) if prefix_len is not None else None

    def mask_mod(b, h, q, k):
        ok = k <= q
        if pre is not None:
            ok = ok | (k < pre[b])
        if seg is not None:
            ok = ok & (seg[b, q] == seg[b, k])
        return ok

    return create_block_mask(mask_mod, batch, None, seq_len, seq_len, device=device)


def attention_mask(segment_ids: torch.Tensor | None = None, prefix_len: torch.Tensor | None = None, *,
                   seq_len: int, batch: int, device=None) -> torch.Tensor:
    """Megatron-style mask [b, 1, s, s], True = masked out."""
    return ~allowed(segment_ids, prefix_len, seq_len, batch, device).unsqueeze(1)
