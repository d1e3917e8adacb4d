"""The fused qkv + rotary + layout function computes exactly what Megatron's split, rotary and permute compute,
forward and backward, eagerly and compiled."""

import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from megatron.core.models.common.embeddings.rope_utils import _apply_rotary_pos_emb_bshd

from cglab.model import fused


def _freqs(s, rot, base=10000.0):
    inv = 1.0 / base ** (torch.arange(0, rot, 2, dtype=torch.float32) / rot)
    f = torch.outer(torch.arange(s, dtype=torch.float32), inv)
    return torch.cat((f, f), dim=-1)[:, None, None, :]  # Megatron's RotaryEmbedding layout [s, 1, 1, rot]


def _megatron(mixed, freqs, heads, head_dim):
    """Megatron's path: view per head as [q|k|v], split, rotary on q and k, then SDPA's [b, h, s, d]."""
    s, b, _ = mixed.shape
    q, k, v = torch.split(mixed.view(s, b, heads, 3 * head_dim), [head_dim] * 3, dim=3)
    q, k = (_apply_rotary_pos_emb_bshd(t, freqs) for t in (q, k))
    return tuple(t.permute(1, 2, 0, 3) for t in (q, k, v))


@settings(max_examples=25, deadline=None)
@given(
    s=st.integers(1, 9),
    b=st.integers(1, 3),
    heads=st.integers(1, 3),
    half=st.integers(1, 4),
    extra=st.sampled_from([0, 2, 6]),
    seed=st.integers(0, 2**16),
)
def test_forward_and_backward_equal_megatron(s, b, heads, half, extra, seed):
    rot, head_dim = 2 * half, 2 * half + extra  # partial rotary when extra > 0
    g = torch.Generator().manual_seed(seed)
    mixed = torch.randn(s, b, heads * 3 * head_dim, generator=g)
    freqs = _freqs(s, rot)
    a = mixed.clone().requires_grad_()
    b_ = mixed.clone().requires_grad_()
    ours, ref = fused.qkv_rope_eager(a, freqs, heads, head_dim), _megatron(b_, freqs, heads, head_dim)
    upstream = [torch.randn(t.shape, generator=g) for t in ref]
    for o, r in zip(ours, ref):
        assert o.is_contiguous() and o.shape == (b, heads, s, head_dim)
        torch.testing.assert_close(o, r, rtol=0, atol=0)
    torch.autograd.backward(ours, upstream)
    torch.autograd.backward(ref, upstream)
    torch.testing.assert_close(a.grad, b_.grad, rtol=1e-6, atol=1e-6)


def test_rotary_is_applied_to_q_and_k_only():
    heads, head_dim, s = 2, 8, 5
    mixed = torch.randn(s, 1, heads * 3 * head_dim)
    q, k, v = fused.qkv_rope_eager(mixed, _freqs(s, 4), heads, head_dim)
    q0, k0, v0 = fused.qkv_rope_eager(mixed, torch.zeros(s, 1, 1, 4), heads, head_dim)  # angle 0: identity
    assert torch.equal(v, v0)
    assert not torch.allclose(q[:, :, 1:, :4], q0[:, :, 1:, :4])  # positions > 0 rotate
    assert torch.equal(q[..., 4:], q0[..., 4:]) and torch.equal(k[..., 4:], k0[..., 4:])  # pass-through dims


def test_compiled_equals_eager():
    """The torch.compile'd functions (what runs on GPU) trace in one graph and keep the maths, incl. backward."""
    torch._dynamo.reset()
    heads, head_dim, s, b = 2, 16, 12, 2
    mixed = torch.randn(s, b, heads * 3 * head_dim)
    freqs = _freqs(s, 8)
    a, c = mixed.clone().requires_grad_(), mixed.clone().requires_grad_()
    ours = fused.compiled(fused.qkv_rope_eager)(c, freqs, heads, head_dim)
    ref = fused.qkv_rope_eager(a, freqs, heads, head_dim)
    up = [torch.randn_like(t) for t in ref]
    for o, r in zip(ours, ref):
        assert o.is_contiguous()
        torch.testing.assert_close(o, r, rtol=1e-5, atol=1e-6)
    torch.autograd.backward(ours, up)
    torch.autograd.backward(ref, up)
    torch.testing.assert_close(c.grad, a.grad, rtol=1e-5, atol=1e-6)
    h, x, y, bias = *(torch.randn(s, b, 8) for _ in range(3)), torch.randn(8)
    torch.testing.assert_close(fused.compiled(fused.residual_sum_eager)(h, x, y, bias), h + x + y + bias)


@settings(max_examples=15, deadline=None)
@given(s=st.integers(1, 7), b=st.integers(1, 3), v=st.integers(2, 40), seed=st.integers(0, 2**16))
def test_cross_entropy_equals_megatron_vocab_parallel(single_rank, s, b, v, seed):
    """[s, b, V] logits, [b, s] labels -> [b, s] loss, forward and backward, as Megatron's (TP=1) loss."""
    from megatron.core import tensor_parallel

    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(s, b, v, generator=g) * 3
    labels = torch.randint(0, v, (b, s), generator=g)
    a, r = logits.clone().requires_grad_(), logits.clone().requires_grad_()
    ours = fused.cross_entropy_eager(a, labels)
    ref = tensor_parallel.vocab_parallel_cross_entropy(r, labels.t().contiguous()).t()
    assert ours.shape == (b, s)
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)
    up = torch.rand(b, s, generator=g)
    ours.backward(up)
    ref.backward(up)
    torch.testing.assert_close(a.grad, r.grad, rtol=1e-5, atol=1e-6)


def test_compiled_cross_entropy_equals_eager():
    torch._dynamo.reset()
    logits, labels = torch.randn(6, 2, 33), torch.randint(0, 33, (2, 6))
    a, c = logits.clone().requires_grad_(), logits.clone().requires_grad_()
    ref, ours = fused.cross_entropy_eager(a, labels), fused.compiled(fused.cross_entropy_eager)(c, labels)
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-6)
    up = torch.rand(2, 6)
    ref.backward(up)
    ours.backward(up)
    torch.testing.assert_close(c.grad, a.grad, rtol=1e-5, atol=1e-6)
