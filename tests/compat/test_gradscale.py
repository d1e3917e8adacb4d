"""train.fold_grad_scale: the 1/tokens factor and the clip applied inside fused AdamW give Megatron's own step."""

from __future__ import annotations

import pytest
import torch

from cglab.config import from_dict

pytestmark = [pytest.mark.slow, pytest.mark.no_ray]  # no_ray: runs beside the Ray tests (Makefile: RAY_TESTS)


def _batches(n, mb=2, s=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        tok = torch.randint(0, 1000, (mb, s), generator=g)
        mask = (torch.rand(mb, s, generator=g) > 0.3).float()  # uneven token counts per micro-batch
        out.append(
            {
                "tokens": tok,
                "labels": torch.roll(tok, -1, 1),
                "loss_mask": mask,
                "segment_ids": torch.zeros(mb, s, dtype=torch.long),
            }
        )
    return out


def _run(overrides, steps=3, micro=2):
    from megatron.core import tensor_parallel

    from cglab.compat.adam import use_fused_adam as _use_fused_adam
    from cglab.train.step import build_train_state, train_step

    cfg = from_dict(
        {},
        [
            "model.preset=tiny",
            "train.micro_batch_size=2",
            f"train.global_batch_size={2 * micro}",
            "train.train_steps=10",
            "train.warmup_steps=0",
            "train.lr=1e-2",
            *overrides,
        ],
    )
    torch.manual_seed(0)
    tensor_parallel.model_parallel_cuda_manual_seed(0)
    state = build_train_state(cfg)
    _use_fused_adam(state.optimizer)  # the same Adam kernel on both sides (CPU default: foreach)
    batches = _batches(steps * micro)
    hist = [train_step(state, cfg, batches[i * micro : (i + 1) * micro]) for i in range(steps)]
    params = [p.detach().clone() for p in state.model[0].parameters()]
    grads = [p.main_grad.detach().clone() for p in state.model[0].parameters()]
    return state, hist, params, grads


@pytest.mark.parametrize("clip", [1.0, 1.0e6, 0.0], ids=["clipped", "not-clipped", "no-clip"])
def test_fold_equals_megatron_step(single_rank, clip):
    base = [f"train.grad_clip={clip}"]
    # One step: the same update and the same grads left behind, to fp32 rounding.
    ref_state, ref, ref_p, ref_g = _run(base, steps=1)
    state, got, p, g = _run([*base, "train.fold_grad_scale=true"], steps=1)
    assert ref_state.grad_fold is None and state.grad_fold is not None
    assert state.grad_fold.factor is None  # consumed by the step
    if clip == 1.0:  # the clip really engaged (else this case would not cover it)
        assert ref[0]["grad_norm"] > 1.5 * clip
    assert got[0]["grad_norm"] == pytest.approx(ref[0]["grad_norm"], rel=1e-6)
    for a, b in zip(ref_p, p):
        torch.testing.assert_close(b, a, rtol=1e-6, atol=1e-7)
    # the grads left behind are the scaled ones, as after Megatron's step (rounding is relative to the largest)
    for a, b in zip(ref_g, g):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6 * float(a.abs().max()))
    # Several steps: the same losses and grad norms (Adam amplifies rounding in near-zero grads, so the
    # parameters are compared after one step only).
    _, ref, _, _ = _run(base, steps=3)
    _, got, _, _ = _run([*base, "train.fold_grad_scale=true"], steps=3)
    for a, b in zip(ref, got):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-5)
        assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-4)
        assert b["update_ok"] == 1.0


def test_install_needs_fused_adam(single_rank):
    from cglab.compat import gradscale as megatron_gradscale
    from cglab.train.step import build_train_state

    cfg = from_dict({}, ["model.preset=tiny"])
    state = build_train_state(cfg)  # CPU: Megatron's foreach AdamW, not fused
    with pytest.raises(ValueError, match="train.fold_grad_scale"):
        megatron_gradscale.install(state.model, state.optimizer)


@pytest.mark.parametrize(
    "overrides, cuda, plan",
    [
        ([], True, (True, True)),  # the GPU default: fused AdamW, folded
        ([], False, (False, False)),  # the CPU default: Megatron's foreach AdamW, nothing folded
        (["parallel.distributed_optimizer=true"], True, (True, False)),
        (["train.fused_adam=false"], True, (False, False)),
        (["train.fold_grad_scale=false"], True, (True, False)),
        (["train.fold_grad_scale=true"], False, (True, True)),  # asked for on CPU: CPU fused AdamW
    ],
)
def test_adam_plan_defaults(overrides, cuda, plan):
    from cglab.decisions import adam_plan

    got = adam_plan(from_dict({}, ["model.preset=tiny", *overrides]), cuda)
    assert (got.impl, got.fused, got.fold) == ("torch", *plan)


@pytest.mark.parametrize("impl", ["te", "apex"])
def test_adam_plan_where_megatron_builds_a_fused_adam_of_its_own(impl):
    """The GPU images install Transformer Engine, and then Megatron builds TE's FusedAdam, which takes no grad
    scale: the default fold is off there (it used to turn on and crash at start), an explicit one is refused."""
    from cglab.config import ConfigError
    from cglab.decisions import adam_plan

    cfg = from_dict({}, ["model.preset=tiny"])
    got = adam_plan(cfg, True, impl)
    assert (got.impl, got.fused, got.fold) == (impl, True, False)
    with pytest.raises(ConfigError, match="train.fold_grad_scale: Megatron-Core builds"):
        adam_plan(from_dict({}, ["model.preset=tiny", "train.fold_grad_scale=true"]), True, impl)


class _TEFusedAdam(torch.optim.Optimizer):
    """Transformer Engine's FusedAdam as Megatron-Core 0.16.1 builds it (its constructor takes adam_w_mode), and
    as `built_adam` sees it: a class of module transformer_engine.*. Plain AdamW maths, so a step really runs."""

    __module__ = "transformer_engine.pytorch.optimizers.fused_adam"

    def __init__(self, params, lr, weight_decay, betas, eps, adam_w_mode=True):
        super().__init__(params, dict(lr=lr, weight_decay=weight_decay, betas=betas, eps=eps))

    @torch.no_grad()
    def step(self, closure=None):
        from torch.optim.adamw import adamw

        for g in self.param_groups:
            adamw(
                *self._lists(g),
                beta1=g["betas"][0],
                beta2=g["betas"][1],
                lr=g["lr"],
                weight_decay=g["weight_decay"],
                eps=g["eps"],
                amsgrad=False,
                maximize=False,
                foreach=False,
                capturable=False,
                differentiable=False,
                fused=None,
                grad_scale=None,
                found_inf=None,
            )

    def _lists(self, g):
        ps = [p for p in g["params"] if p.grad is not None]
        for p in ps:
            st = self.state[p]
            if not st:
                st.update(step=torch.tensor(0.0), exp_avg=torch.zeros_like(p), exp_avg_sq=torch.zeros_like(p))
        st = [self.state[p] for p in ps]
        return (
            ps,
            [p.grad for p in ps],
            [s["exp_avg"] for s in st],
            [s["exp_avg_sq"] for s in st],
            [],
            [s["step"] for s in st],
        )


def test_fold_follows_the_optimizer_megatron_built(single_rank, monkeypatch):
    """With Megatron building TE's FusedAdam (Transformer Engine importable), the fold is decided from that
    optimizer: an explicit fold is a config error naming the field, the default trains without it."""
    from megatron.core import optimizer as mo

    from cglab.compat.adam import built_adam
    from cglab.config import ConfigError
    from cglab.train.step import build_train_state, train_step

    monkeypatch.setattr(mo, "Adam", _TEFusedAdam)
    monkeypatch.setattr(mo, "USING_PYTORCH_OPTIMIZER", False)
    base = ["model.preset=tiny", "train.micro_batch_size=2", "train.global_batch_size=4", "train.warmup_steps=0"]
    with pytest.raises(ConfigError, match="train.fold_grad_scale: Megatron-Core builds TE's FusedAdam"):
        build_train_state(from_dict({}, [*base, "train.fold_grad_scale=true"]))
    cfg = from_dict({}, base)
    state = build_train_state(cfg)
    assert built_adam(state.optimizer) == "te" and state.grad_fold is None
    before = [p.detach().clone() for p in state.model[0].parameters()]
    out = train_step(state, cfg, _batches(2))
    assert out["update_ok"] == 1.0 and out["loss"] == out["loss"]
    assert any(not torch.equal(a, b) for a, b in zip(before, state.model[0].parameters()))
