"""One training step leaves nothing behind that changes the next one: the gradients of a step depend only on the
weights and the batch (what a checkpoint restores), not on whether an optimizer step ran in this process before."""

import pytest
import torch

from cglab.config import from_dict

pytestmark = [pytest.mark.slow, pytest.mark.no_ray]  # no_ray: runs beside the Ray tests (Makefile: RAY_TESTS)


def _micro(g, mb=2, s=32, vocab=1024):
    tok = torch.randint(0, vocab, (mb, s), generator=g)
    return {
        "tokens": tok,
        "labels": torch.roll(tok, -1, 1),
        "loss_mask": torch.ones(mb, s),
        "segment_ids": torch.zeros(mb, s, dtype=torch.long),
    }


@pytest.mark.parametrize("micro", [1, 2])
def test_the_gradients_after_an_optimizer_step_are_the_batch_s_alone(single_rank, micro):
    """fp32 (Megatron's FP32Optimizer, every CPU run): its step sets param.grad = param.main_grad; unless the step
    clears it, autograd adds the next step's first micro-batch into that alias and DDP's hook adds it again, so
    training used 2 g1 + g2, and a run resumed from a checkpoint (no alias yet) took another update."""
    from cglab.train.step import build_train_state, forward_backward, train_step

    cfg = from_dict(
        {},
        [
            "model.preset=tiny",
            "train.micro_batch_size=2",
            f"train.global_batch_size={2 * micro}",
            "train.warmup_steps=0",
        ],
    )
    g = torch.Generator().manual_seed(0)
    batches = [[_micro(g) for _ in range(micro)] for _ in range(2)]
    state = build_train_state(cfg)

    def grads():
        forward_backward(state, cfg, batches[1])
        return [p.main_grad.clone() for p in state.model[0].parameters()]

    train_step(state, cfg, batches[0])  # an optimizer step ran: the alias exists unless it was cleared
    first, again = grads(), grads()
    for a, b in zip(first, again):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
