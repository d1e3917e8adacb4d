"""Attention masks: prefix-LM opens exactly the prefix block; documents never see each other."""
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from cglab.model.masks import allowed


@settings(max_examples=50, deadline=None)
@given(s=st.integers(2, 40), data=st.data())
def test_prefix_lm_only_opens_the_prefix(s, data):
    p = data.draw(st.integers(0, s))
    causal = allowed(None, None, s, 1)[0]
    prefix = allowed(None, torch.tensor([p]), s, 1)[0]
    changed = (prefix != causal).nonzero().tolist()
    # exactly the pairs (q, k) with q < k < p become visible; nothing is hidden
    expected = [[q, k] for q in range(s) for k in range(s) if q < k < p]
    assert changed == expected
    assert not (causal & ~prefix).any()


def test_prefix_tokens_see_later_prefix_tokens():
    ok = allowed(None, torch.tensor([4]), 8, 1)[0]
    assert ok[0, 3] and not ok[0, 4] and not ok[4, 5] and ok[5, 4]


@settings(max_examples=50, deadline=None)
@given(lengths=st.lists(st.integers(1, 8), min_size=1, max_size=5))
def test_documents_are_isolated(lengths):
    seg = torch.cat([torch.full((n,), i) for i, n in enumerate(lengths)]).unsqueeze(0)
    s = seg.shape[1]
    ok = allowed(seg, None, s, 1)[0]
    for q in range(s):
        for k in range(s):
            assert bool(ok[q, k]) == (k <= q and seg[0, q] == seg[0, k])


def test_document_masking_changes_model_output(single_rank, tiny_cfg):
    from cglab.model.codegen import build_model, forward_logits

    m = tiny_cfg.model
    model = build_model(m, tiny_cfg.parallel).eval()
    tokens = torch.randint(0, m.vocab_size, (1, 16))
    seg = torch.zeros_like(tokens)
    seg[:, 8:] = 1
    with torch.no_grad():
        joined = forward_logits(model, m, tokens, torch.zeros_like(tokens))
        split = forward_logits(model, m, tokens, seg)
        alone = forward_logits(model, m, tokens[:, 8:], torch.zeros_like(tokens[:, 8:]))
    torch.testing.assert_close(split[:, :8], joined[:, :8])
    # the second document is computed as if it stood alone (rotary attention is relative)
    torch.testing.assert_close(split[:, 8:], alone, atol=1e-5, rtol=1e-4)
    assert not torch.allclose(split[:, 8:], joined[:, 8:])


@settings(max_examples=20, deadline=None)
@given(data=st.data(), b=st.integers(1, 3), s=st.integers(2, 40), with_docs=st.booleans(),
       with_prefix=st.booleans())
def test_flex_block_mask_attends_like_the_dense_mask(data, b, s, with_docs, with_prefix):
    """FlexAttention with `block_mask` gives SDPA-with-`attention_mask` outputs for documents and prefixes."""
    import torch.nn.functional as F
    from torch.nn.attention.flex_attention import flex_attention

    from cglab.model.masks import attention_mask, block_mask

    seg = pre = None
    if with_docs:
        cuts = data.draw(st.lists(st.lists(st.booleans(), min_size=s, max_size=s), min_size=b, max_size=b))
        seg = torch.tensor(cuts, dtype=torch.long).cumsum(1)
    if with_prefix:
        pre = torch.tensor(data.draw(st.lists(st.integers(0, s), min_size=b, max_size=b)))
    g = torch.Generator().manual_seed(data.draw(st.integers(0, 2**16)))
    q, k, v = (torch.randn(b, 2, s, 8, generator=g) for _ in range(3))
    dense = attention_mask(seg, pre, seq_len=s, batch=b)
    ref = F.scaled_dot_product_attention(q, k, v, attn_mask=~dense)
    got = flex_attention(q, k, v, block_mask=block_mask(seg, pre, seq_len=s, batch=b))
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)


def test_compiled_flex_attention_is_traced_once_per_mask_kind():
    """A new block mask each micro-batch (new segment ids, new closure) reuses the compiled kernel; only a different
    kind of mask (documents + prefix vs documents) traces again. Recompiling per step would make `flex` useless."""
    from torch._dynamo.utils import counters
    from torch.nn.attention.flex_attention import flex_attention

    from cglab.model.fused import compiled
    from cglab.model.masks import block_mask

    torch._dynamo.reset()
    counters.clear()
    compiled.cache_clear()
    flex = compiled(flex_attention)  # what SDPAttention.attend runs on GPU
    b, s = 2, 128
    q, k, v = (torch.randn(b, 2, s, 16) for _ in range(3))
    graphs = []
    for i in range(4):
        seg = (torch.rand(b, s) < 0.05 * (i + 1)).long().cumsum(1)
        bm = block_mask(seg, torch.tensor([3 * i, 7]) if i % 2 else None, seq_len=s, batch=b)
        with torch.no_grad():
            got = flex(q, k, v, block_mask=bm)
        graphs.append(counters["stats"]["unique_graphs"])
        if i == 3:
            torch.testing.assert_close(got, flex_attention(q, k, v, block_mask=bm), atol=1e-5, rtol=1e-5)
    assert graphs == [1, 2, 2, 2], graphs
