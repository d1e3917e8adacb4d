"""The CodeGen block's elementwise glue, written as pure functions and compiled into one kernel each on GPU.

Between its GEMMs the eager block spends its time moving activations: Megatron splits the qkv projection into
strided views, applies partial rotary to q and k in about eight passes each (slice, cos, rotate-half, sin, add, cat),
and SDPA then copies the heads into its layout; the parallel residual `x + attn + mlp + bias` is three more passes.
`qkv_rope` does split + rotary + [b, heads, s, head_dim] layout in one read of the qkv output and one write of
q, k, v (and one kernel back in the backward); `residual_sum` is one pass; `cross_entropy` (TP=1) is the LM loss in
one pass over the logits each way, where Megatron's fused cross-entropy makes several fp32 passes. On CPU they run
eagerly (same maths).
"""

from __future__ import annotations

import functools

import torch


def _rotate(t: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Megatron's non-interleaved ("rotate half") rotary on the first cos.shape[-1] dims of t; the rest pass."""
    rot = cos.shape[-1]
    t_rot, t_pass = t[..., :rot], t[..., rot:]
    x1, x2 = t_rot.chunk(2, dim=-1)
    rotated = torch.cat((-x2, x1), dim=-1)
    return torch.cat((t_rot * cos + rotated * sin, t_pass), dim=-1)


def qkv_rope_eager(mixed: torch.Tensor, freqs: torch.Tensor, heads: int, head_dim: int):
    """mixed [s, b, heads*3*head_dim] in Megatron's per-head [q|k|v] layout (no GQA), freqs [s, 1, 1, rot]
    -> q, k, v as contiguous [b, heads, s, head_dim], rotary applied to q and k."""
    s, b, _ = mixed.shape
    q, k, v = mixed.view(s, b, heads, 3, head_dim).unbind(3)
    cos, sin = torch.cos(freqs).to(mixed.dtype), torch.sin(freqs).to(mixed.dtype)
    q, k = _rotate(q, cos, sin), _rotate(k, cos, sin)
    return tuple(t.permute(1, 2, 0, 3).contiguous() for t in (q, k, v))


def cross_entropy_eager(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """logits [s, b, V] (the whole vocabulary: TP=1), labels [b, s] -> per-token loss [b, s], softmax in fp32.
    Compiled, the fp32 logits are never stored: one pass reads the bf16 logits for the log-sum-exp, and the backward
    writes (softmax - onehot) in one more."""
    s, b, v = logits.shape
    loss = torch.nn.functional.cross_entropy(
        logits.float().reshape(s * b, v), labels.t().reshape(s * b), reduction="none"
    )
    return loss.view(s, b).t().contiguous()


def residual_sum_eager(
    hidden: torch.Tensor, attn: torch.Tensor, mlp: torch.Tensor, mlp_bias: torch.Tensor | None
) -> torch.Tensor:
    out = hidden + attn + mlp
    return out if mlp_bias is None else out + mlp_bias


@functools.cache
def compiled(fn):
    """`fn` under torch.compile as one static-shape graph, built once per function and shared by every layer."""
    return torch.compile(fn, fullgraph=True, dynamic=False)


def on_device(fn, like: torch.Tensor):
    """compiled(fn) for CUDA tensors; fn itself elsewhere (the CPU runs the same maths eagerly)."""
    return compiled(fn) if like.is_cuda else fn


def qkv_rope(mixed, freqs, heads, head_dim):
    return on_device(qkv_rope_eager, mixed)(mixed, freqs, heads, head_dim)


def cross_entropy(logits, labels):
    return on_device(cross_entropy_eager, logits)(logits, labels)


def residual_sum(hidden, attn, mlp, mlp_bias):
    return on_device(residual_sum_eager, hidden)(hidden, attn, mlp, mlp_bias)
