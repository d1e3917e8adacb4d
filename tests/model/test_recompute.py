"""Activation recomputation (model.recompute: selective, full uniform / block) gives the loss and every gradient of
no recomputation, with hidden dropout on (Megatron's checkpoint must replay the same masks), and really reruns
the attention in backward: the core attention runs once more per recomputed layer and micro-batch."""

import pytest
import torch

from cglab.config import from_dict
from cglab.model.attention import SDPAttention
from tests.model.test_parallel import _batches

LAYERS, MICRO = 3, 2


def _fwd_bwd(monkeypatch, *overrides):
    """(loss, {name: fp32 main grad}, core-attention calls) of one step of a 3-layer tiny model at TP=1."""
    from cglab.train.step import build_train_state, forward_backward, reduce_stats

    calls = []
    attend = SDPAttention.attend
    monkeypatch.setattr(SDPAttention, "attend", lambda self, *a: calls.append(1) or attend(self, *a))
    cfg = from_dict(
        {},
        [
            "model.preset=tiny",
            f"model.num_layers={LAYERS}",
            "model.hidden_dropout=0.1",
            "model.attention_backend=sdpa",
            "train.micro_batch_size=2",
            "train.global_batch_size=4",
            *overrides,
        ],
    )
    state = build_train_state(cfg)
    torch.manual_seed(0)  # the dropout masks: the same draws for every variant
    loss = reduce_stats(forward_backward(state, cfg, _batches(cfg.model.vocab_size, n_micro=MICRO)))["loss"]
    grads = {n: p.main_grad.detach().clone() for n, p in state.model[0].module.named_parameters()}
    return loss, grads, len(calls)


@pytest.mark.parametrize(
    "overrides, reruns",
    [
        (["model.recompute=selective"], LAYERS),  # cglab's fused attention (compile_fusions on wherever it applies)
        (["model.recompute=selective", "model.compile_fusions=false"], LAYERS),  # Megatron's own attention path
        (["model.recompute=full"], LAYERS),  # uniform, one layer per unit
        (["model.recompute=full", "model.recompute_num_layers=3"], LAYERS),  # uniform, the 3 layers as one unit
        (["model.recompute=full", "model.recompute_method=block", "model.recompute_num_layers=2"], 2),
    ],
)
def test_recompute_matches_no_recompute(overrides, reruns, single_rank, monkeypatch):
    fusions = [o for o in overrides if o.startswith("model.compile_fusions")]
    loss, grads, calls = _fwd_bwd(monkeypatch, *fusions)
    assert calls == LAYERS * MICRO  # no recomputation: each layer's attention once per micro-batch
    got_loss, got_grads, got_calls = _fwd_bwd(monkeypatch, *overrides)
    assert got_calls == (LAYERS + reruns) * MICRO, overrides
    assert abs(got_loss - loss) < 1e-6, (got_loss, loss)
    assert got_grads.keys() == grads.keys()
    for k, g in grads.items():
        assert g.abs().sum() > 0 or "bias" in k, k
        torch.testing.assert_close(got_grads[k], g, atol=1e-6, rtol=1e-5, msg=k)
