"""The foreach multi-tensor ops compute what Megatron's local fallbacks compute, and a clipped optimizer step with
them leaves the same weights."""

import pytest
import torch

from cglab.compat import cpu as megatron_cpu
from cglab.compat import foreach as megatron_foreach


@pytest.fixture(scope="module")
def local_ops():
    megatron_cpu.apply()  # Megatron's local l2 norm builds its result with device="cuda"
    from megatron.core import utils

    return utils.local_multi_tensor_l2_norm, utils.local_multi_tensor_scale


def _tensors(seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(*s, generator=g) * (i + 1) for i, s in enumerate([(7, 3), (11,), (4, 5, 6), (1,), (64, 2)])]


def test_l2_norm_matches_megatron_local(local_ops):
    local_l2, _ = local_ops
    ts = _tensors()
    ours, _ = megatron_foreach.l2_norm(0, None, [ts], False)
    ref, _ = local_l2(0, None, [ts], False)
    assert ours.shape == (1,) and ours.dtype == torch.float32
    torch.testing.assert_close(ours, ref.to(ours.device), rtol=1e-6, atol=0)
    torch.testing.assert_close(ours[0], torch.linalg.vector_norm(torch.cat([t.flatten() for t in ts])))
    assert megatron_foreach.l2_norm(0, None, [[]], False)[0].item() == 0.0


@pytest.mark.parametrize("factor", [1.0, 0.37])
def test_scale_copy_to_other_dtype_matches_megatron_local(local_ops, factor):
    _, local_scale = local_ops
    src = _tensors(1)
    ours = [torch.empty_like(t, dtype=torch.bfloat16) for t in src]
    ref = [torch.empty_like(t, dtype=torch.bfloat16) for t in src]
    megatron_foreach.scale(0, None, [src, ours], factor)
    local_scale(0, None, [src, ref], factor)
    for a, b in zip(ours, ref):
        assert torch.equal(a, b)


def test_scale_in_place(local_ops):
    _, local_scale = local_ops
    ours, ref = _tensors(2), _tensors(2)
    megatron_foreach.scale(0, None, [ours, ours], 0.5)
    local_scale(0, None, [ref, ref], 0.5)
    for a, b in zip(ours, ref):
        assert torch.equal(a, b)
    assert not torch.equal(ours[0], _tensors(2)[0])


def test_apply_swaps_only_the_local_fallbacks(local_ops):
    from megatron.core.optimizer import clip_grads, optimizer

    saved = clip_grads.l2_norm_impl, clip_grads.multi_tensor_scale_impl, optimizer.multi_tensor_scale_impl
    try:
        clip_grads.l2_norm_impl, clip_grads.multi_tensor_scale_impl = local_ops
        optimizer.multi_tensor_scale_impl = local_ops[1]
        assert megatron_foreach.apply() and megatron_foreach.apply()  # idempotent
        assert clip_grads.l2_norm_impl is megatron_foreach.l2_norm
        assert clip_grads.multi_tensor_scale_impl is optimizer.multi_tensor_scale_impl is megatron_foreach.scale

        def apex_kernel(*a):  # stands for an installed library's kernel, which must be left alone
            raise AssertionError

        clip_grads.l2_norm_impl = apex_kernel
        megatron_foreach.apply()
        assert clip_grads.l2_norm_impl is apex_kernel
    finally:
        clip_grads.l2_norm_impl, clip_grads.multi_tensor_scale_impl, optimizer.multi_tensor_scale_impl = saved


def test_clipped_optimizer_step_equals_local_fallback(local_ops):
    """Whole Megatron optimizer step (grad norm, clipping, AdamW) with the foreach ops vs the local loops. The grad
    norm is far above train.grad_clip, so Megatron applies a clip coefficient < 1 through the installed scale op
    (counted: a step that never reached it would check nothing), and the clipped grads are compared as well as the
    weights: AdamW's first update is nearly invariant to a common grad scale, so the weights alone would hide a
    wrong clip."""
    from megatron.core.optimizer import clip_grads, optimizer

    from cglab.config import from_dict
    from cglab.distributed import destroy_parallel, init_parallel
    from cglab.train.step import build_train_state, train_step

    clip = 0.01
    cfg = from_dict(
        {},
        [
            "model.preset=tiny",
            "data.seq_length=16",
            "train.micro_batch_size=2",
            "train.global_batch_size=2",
            f"train.grad_clip={clip}",
            "train.warmup_steps=0",
            "model.document_masking=false",
        ],
    )
    g = torch.Generator().manual_seed(0)
    tok = torch.randint(0, cfg.model.vocab_size, (2, 16), generator=g)
    batch = {
        "tokens": tok,
        "labels": torch.roll(tok, -1, 1),
        "loss_mask": torch.ones(2, 16),
        "objective": torch.zeros(2, dtype=torch.long),
    }
    saved = clip_grads.l2_norm_impl, clip_grads.multi_tensor_scale_impl, optimizer.multi_tensor_scale_impl
    results = []
    try:
        for use_foreach in (True, False):
            init_parallel(1, 1)
            state = build_train_state(cfg)  # applies the foreach ops
            if use_foreach:
                assert clip_grads.multi_tensor_scale_impl is megatron_foreach.scale
                assert clip_grads.l2_norm_impl is megatron_foreach.l2_norm
                norm_op, scale_op = megatron_foreach.l2_norm, megatron_foreach.scale
            else:
                norm_op, scale_op = local_ops
            factors = []

            def counted_scale(chunk_size, noop_flag, tensor_lists, factor, _op=scale_op, _seen=factors):
                _seen.append(factor)
                return _op(chunk_size, noop_flag, tensor_lists, factor)

            clip_grads.l2_norm_impl, clip_grads.multi_tensor_scale_impl = norm_op, counted_scale
            optimizer.multi_tensor_scale_impl = scale_op
            stats = train_step(state, cfg, [batch])
            model = state.model[0]
            # Megatron's FP32 optimizer steps on param.grad = param.main_grad: the clipped grads are still there
            grads = [p.main_grad.detach().clone() for p in model.parameters()]
            results.append((stats["grad_norm"], factors, grads, [p.detach().clone() for p in model.parameters()]))
            destroy_parallel()
    finally:
        clip_grads.l2_norm_impl, clip_grads.multi_tensor_scale_impl, optimizer.multi_tensor_scale_impl = saved
    (norm_a, factors_a, grads_a, params_a), (norm_b, factors_b, grads_b, params_b) = results
    assert norm_a > 100 * clip  # clipping was active, strongly
    assert norm_a == pytest.approx(norm_b, rel=1e-6)
    # the clip went through the scale op, once, with Megatron's coefficient
    assert factors_a == [pytest.approx(clip / (norm_a + 1e-6), rel=1e-9)] and factors_b == factors_a
    clipped = torch.linalg.vector_norm(torch.cat([t.flatten() for t in grads_a]))
    assert clipped.item() == pytest.approx(clip, rel=1e-4)
    for a, b in zip(grads_a, grads_b):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-9)
    for a, b in zip(params_a, params_b):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
