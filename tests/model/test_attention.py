"""model.sdpa_kernel reaches every layer's core attention and only reorders SDPA's kernels: the maths is unchanged."""

import pytest
import torch
from torch.nn.attention import SDPBackend

from cglab.config import from_dict
from cglab.model.attention import KERNEL_PRIORITY, SDPAttention
from cglab.model.codegen import build_model, forward_logits


@pytest.mark.parametrize("kernel", sorted(KERNEL_PRIORITY))
def test_kernel_choice_is_first_in_priority_inside_attend(kernel):
    first = {
        "cudnn": SDPBackend.CUDNN_ATTENTION,
        "flash": SDPBackend.FLASH_ATTENTION,
        "efficient": SDPBackend.EFFICIENT_ATTENTION,
    }[kernel]
    before = torch._C._get_sdp_priority_order()
    cfg = from_dict({}, ["model.preset=tiny"]).model
    attn = SDPAttention(_tc(cfg), 1, None, "self", kernel=kernel)
    with attn._kernels():
        order = torch._C._get_sdp_priority_order()
        assert order[0] == int(first)
        assert {int(b) for b in KERNEL_PRIORITY[kernel]} <= set(order)  # the others stay as fallbacks
    assert torch._C._get_sdp_priority_order() == before  # restored after the call


def _tc(m):
    from cglab.config import ParallelConfig
    from cglab.model.codegen import transformer_config

    return transformer_config(m, ParallelConfig())


@pytest.mark.parametrize("arch, docs", [("causal", False), ("causal", True), ("prefix_lm", False)])
def test_every_layer_gets_the_kernel_and_logits_are_unchanged(single_rank, arch, docs):
    ov = ["model.preset=tiny", f"model.architecture={arch}", f"model.document_masking={str(docs).lower()}"]
    auto = from_dict({}, ov).model
    cudnn = from_dict({}, [*ov, "model.sdpa_kernel=cudnn"]).model
    p = from_dict({}, ov).parallel
    a, c = build_model(auto, p, seed=3), build_model(cudnn, p, seed=3)
    cores = [layer.self_attention.core_attention for layer in c.decoder.layers]
    assert cores and all(x.priority == KERNEL_PRIORITY["cudnn"] for x in cores)
    assert all(layer.self_attention.core_attention.priority is None for layer in a.decoder.layers)
    tok = torch.randint(0, auto.vocab_size, (2, 32))
    seg = torch.arange(32).div(10, rounding_mode="floor").expand(2, 32)
    pre = torch.tensor([5, 12])
    torch.testing.assert_close(
        forward_logits(c, cudnn, tok, seg, pre), forward_logits(a, auto, tok, seg, pre), rtol=0, atol=0
    )


@pytest.mark.parametrize(
    "cuda, te, dropout, want",
    [
        (False, False, 0.0, "sdpa"),
        (True, False, 0.0, "flex"),
        (True, False, 0.1, "sdpa"),
        (True, True, 0.0, "flex"),  # Transformer Engine installed (the GPU images): auto still never picks it
        (True, True, 0.1, "sdpa"),
    ],
)
def test_auto_backend_resolution(monkeypatch, cuda, te, dropout, want):
    from cglab import decisions as spec
    from cglab.compat import flags

    monkeypatch.setattr(spec.torch.cuda, "is_available", lambda: cuda)
    monkeypatch.setattr(flags, "HAVE_TE", te)
    assert spec.resolve_backend("auto", dropout) == want
    assert spec.resolve_backend("sdpa", dropout) == "sdpa"  # an explicit choice is kept


@pytest.mark.parametrize(
    "overrides",
    [
        [],  # document masking is on by default
        ["model.document_masking=false", "model.architecture=prefix_lm"],
        ["model.document_masking=true", "model.architecture=causal"],
    ],
)
def test_te_with_a_mask_it_would_ignore_is_a_config_error(overrides):
    """TE's DotProductAttention ignores a dense mask for the causal mask type: refused, naming both fields."""
    from cglab.config import ConfigError

    with pytest.raises(
        ConfigError,
        match=r"model\.attention_backend: 'te'.*model\.document_masking.*"
        r"model\.architecture",
    ):
        from_dict({}, ["model.preset=tiny", "model.attention_backend=te", *overrides])
    # plain causal without packed-document masks is what TE's causal kernel does correctly: allowed
    from_dict({}, ["model.preset=tiny", "model.attention_backend=te", "model.document_masking=false"])
