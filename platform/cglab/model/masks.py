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


def attention_mask(segment_ids: torch.Tensor | None = None, prefix_len: torch.Tensor | None = None, *,
                   seq_len: int, batch: int, device=None) -> torch.Tensor:
    """Megatron-style mask [b, 1, s, s], True = masked out."""
    return ~allowed(segment_ids, prefix_len, seq_len, batch, device).unsqueeze(1)
