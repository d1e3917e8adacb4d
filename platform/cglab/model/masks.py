"""Attention masks for packed CodeGen2 batches: causal, prefix-LM and per-document.

Convention (Megatron's): a boolean tensor [b, 1, s, s] where True means "may NOT attend".
"""

from __future__ import annotations

import torch
from torch.nn.attention.flex_attention import create_block_mask


def prefix_ends(prefix_end: torch.Tensor, batch: int, seq_len: int, device=None) -> torch.Tensor:
    """prefix_end as int64 [b, s], one value per query token. A [b] tensor (one prompt per row, as the evaluation
    builds it) means the same value for every token of that row."""
    pre = torch.as_tensor(prefix_end).to(device).long()
    if pre.dim() == 1:
        # contiguous: the same strides as a per-token batch, so compiled FlexAttention does not retrace for it
        return pre.view(batch, 1).expand(batch, seq_len).contiguous()
    if pre.shape != (batch, seq_len):
        raise ValueError(f"prefix_end: shape {tuple(pre.shape)}, expected [{batch}] or [{batch}, {seq_len}]")
    return pre


def allowed(
    segment_ids: torch.Tensor | None, prefix_end: torch.Tensor | None, seq_len: int, batch: int, device=None
) -> torch.Tensor:
    """Boolean [b, s, s], True where query q may attend key k.

    Causal everywhere; keys k < prefix_end[q] are visible to query q as well. The data sets prefix_end, for every
    token of a document with a prefix, to the end of that document's own prefix (0 elsewhere), so each document's
    prefix is bidirectional, its targets stay causal, and no query reaches into a later document; with segment_ids,
    only keys of the query's own document.
    """
    idx = torch.arange(seq_len, device=device)
    ok = (idx[None, :] <= idx[:, None]).expand(batch, seq_len, seq_len)
    if prefix_end is not None:
        pre = prefix_ends(prefix_end, batch, seq_len, device)
        ok = ok | (idx[None, None, :] < pre[:, :, None])
    if segment_ids is not None:
        seg = segment_ids.to(device)
        ok = ok & (seg[:, :, None] == seg[:, None, :])
    return ok


def block_mask(
    segment_ids: torch.Tensor | None, prefix_end: torch.Tensor | None, *, seq_len: int, batch: int, device=None
):
    """The pairs of `allowed` as a FlexAttention BlockMask: no dense [s, s] tensor reaches the kernel, and blocks
    with nothing visible (other documents, the future) are skipped rather than computed and masked."""
    device = torch.device(device or "cpu")
    seg = segment_ids.to(device) if segment_ids is not None else None
    # always per token ([b, s]), so a per-row prefix traces the same mask_mod as the training one
    pre = prefix_ends(prefix_end, batch, seq_len, device) if prefix_end is not None else None

    def mask_mod(b, h, q, k):
        ok = k <= q
        if pre is not None:
            ok = ok | (k < pre[b, q])
        if seg is not None:
            ok = ok & (seg[b, q] == seg[b, k])
        return ok

    return create_block_mask(mask_mod, batch, None, seq_len, seq_len, device=device)


def attention_mask(
    segment_ids: torch.Tensor | None = None,
    prefix_end: torch.Tensor | None = None,
    *,
    seq_len: int,
    batch: int,
    device=None,
) -> torch.Tensor:
    """Megatron-style mask [b, 1, s, s], True = masked out."""
    return ~allowed(segment_ids, prefix_end, seq_len, batch, device).unsqueeze(1)
