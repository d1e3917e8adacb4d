"""Megatron-Core's multi-tensor optimizer ops on torch's `_foreach` kernels, for machines without Apex or TE.

Without either library Megatron falls back to per-tensor Python loops (`megatron.core.utils.local_multi_tensor_*`):
the gradient norm runs `torch.norm` on every parameter and builds a host tensor from the results — one device
sync per parameter, every step — and the main→model parameter copy materialises `src * 1.0` in fp32 before casting.
The foreach kernels do the same arithmetic in a handful of launches with no sync. `apply()` swaps them in only
where Megatron chose its local fallback, so an Apex or TE installation keeps its own kernels.
"""

from __future__ import annotations

import torch


def l2_norm(chunk_size, noop_flag, tensor_lists, per_tensor, *args):
    """Drop-in for amp_C.multi_tensor_l2norm: (total L2 norm as a 1-element fp32 tensor, None)."""
    tensors = tensor_lists[0]
    if not tensors:  # on the device the caller's collectives expect
        device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else "cpu"
        return torch.zeros(1, dtype=torch.float32, device=device), None
    norms = torch._foreach_norm(tensors)
    total = torch.linalg.vector_norm(torch.stack([n.float() for n in norms]))
    return total.reshape(1), None


def scale(chunk_size, noop_flag, tensor_lists, factor):
    """Drop-in for amp_C.multi_tensor_scale: dst[i] = src[i] * factor (cast to dst's dtype); src may be dst."""
    src, dst = tensor_lists
    if not src:
        return
    if factor == 1.0:
        torch._foreach_copy_(dst, src)
    elif all(s is d for s, d in zip(src, dst)):
        torch._foreach_mul_(dst, factor)
    else:
        torch._foreach_copy_(dst, torch._foreach_mul(src, factor))


def apply() -> bool:
    """Replace Megatron's local multi-tensor fallbacks with the foreach versions. Idempotent; returns True when
    the fallbacks were in use (no Apex, no TE)."""
    # Megatron (seconds to import): loaded when a patch runs, not when cglab.decisions imports compat
    from megatron.core import utils as mutils
    from megatron.core.optimizer import clip_grads, optimizer

    swapped = False
    for mod, name, local, ours in (
        (clip_grads, "l2_norm_impl", mutils.local_multi_tensor_l2_norm, l2_norm),
        (clip_grads, "multi_tensor_scale_impl", mutils.local_multi_tensor_scale, scale),
        (optimizer, "multi_tensor_scale_impl", mutils.local_multi_tensor_scale, scale),
    ):
        current = getattr(mod, name)
        if current is local or current is ours:
            setattr(mod, name, ours)
            swapped = True
    return swapped
