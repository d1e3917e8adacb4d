"""Attention masks: prefix-LM opens exactly the prefix block; documents never see each other."""

import pytest
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


@settings(max_examples=50, deadline=None)
@given(s=st.integers(1, 24), data=st.data())
def test_prefix_end_is_per_query_token(s, data):
    ends = torch.tensor(data.draw(st.lists(st.integers(0, s), min_size=s, max_size=s)))
    ok = allowed(None, ends.unsqueeze(0), s, 1)[0]
    for q in range(s):
        for k in range(s):
            assert bool(ok[q, k]) == (k <= q or k < int(ends[q]))
    # a [b] tensor is the same prefix_end for every token of the row (the evaluation's one-prompt rows)
    p = int(ends[0])
    assert torch.equal(allowed(None, torch.tensor([p]), s, 1), allowed(None, torch.full((1, s), p), s, 1))
    with pytest.raises(ValueError, match="prefix_end"):
        allowed(None, torch.zeros(1, s + 1), s, 1)


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
@given(
    data=st.data(),
    b=st.integers(1, 3),
    s=st.integers(2, 40),
    with_docs=st.booleans(),
    with_prefix=st.sampled_from([None, "row", "token"]),
)
def test_flex_block_mask_attends_like_the_dense_mask(data, b, s, with_docs, with_prefix):
    """FlexAttention with `block_mask` gives SDPA-with-`attention_mask` outputs for documents and prefixes (one
    prefix_end per row, as the evaluation passes it, or one per token, as the data does)."""
    import torch.nn.functional as F
    from torch.nn.attention.flex_attention import flex_attention

    from cglab.model.masks import attention_mask, block_mask

    seg = pre = None
    if with_docs:
        cuts = data.draw(st.lists(st.lists(st.booleans(), min_size=s, max_size=s), min_size=b, max_size=b))
        seg = torch.tensor(cuts, dtype=torch.long).cumsum(1)
    if with_prefix:
        n = b if with_prefix == "row" else b * s
        pre = torch.tensor(data.draw(st.lists(st.integers(0, s), min_size=n, max_size=n)))
        pre = pre if with_prefix == "row" else pre.view(b, s)
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
        # i = 1: one prefix_end per row (evaluation), i = 3: per token (training) -- the same kind of mask
        pre = None if i % 2 == 0 else torch.tensor([3, 7]) if i == 1 else torch.randint(0, s, (b, s))
        bm = block_mask(seg, pre, seq_len=s, batch=b)
        with torch.no_grad():
            got = flex(q, k, v, block_mask=bm)
        graphs.append(counters["stats"]["unique_graphs"])
        if i == 3:
            torch.testing.assert_close(got, flex_attention(q, k, v, block_mask=bm), atol=1e-5, rtol=1e-5)
    assert graphs == [1, 2, 2, 2], graphs


@settings(max_examples=30, deadline=None)
@given(
    lengths=st.lists(st.integers(1, 40), min_size=2, max_size=6),
    span_max=st.integers(1, 6),
    ratio=st.floats(0.05, 0.5),
    seed=st.integers(0, 2**31),
    document_masking=st.booleans(),
)
def test_every_packed_document_is_its_own_prefix_lm(lengths, span_max, ratio, seed, document_masking):
    """File-level span corruption of a packed window, through the mask the model gets: each document's prefix
    (corrupted input + <sep>) is bidirectional, its targets are causal, and nothing reaches a later document (nor,
    with document masking, any other one). The FlexAttention block mask admits exactly the same pairs."""
    import numpy as np

    from cglab.config import ModelConfig, ObjectiveConfig
    from cglab.data import objectives as O
    from cglab.data.packing import pack_documents
    from cglab.data.specials import Specials
    from cglab.model.codegen import batch_mask
    from cglab.model.masks import block_mask

    sp, S = Specials.contiguous(1000, 128), 256  # sentinels for the most spans a unit can need at S
    rng = np.random.default_rng(seed)
    docs = [np.append(rng.integers(0, 1000, n), sp.eot).astype(np.int32) for n in lengths]
    cfg = ObjectiveConfig(
        kind="span_corruption",
        corruption="file_level",
        mask_ratio_min=ratio,
        mask_ratio_max=ratio,
        span_len_min=1,
        span_len_max=span_max,
    )
    windows, wsegs = pack_documents(docs, S, sp, O.packing_reserve(cfg))
    out = O.apply_objective_batch(windows, wsegs, cfg, sp, [O.sample_rng(seed, 0, i) for i in range(len(windows))], S)
    W = len(windows)
    seg, pre = torch.from_numpy(out["segment_ids"]).long(), torch.from_numpy(out["prefix_end"]).long()
    m = ModelConfig(architecture="prefix_lm", document_masking=document_masking, attention_backend="sdpa")
    dense = batch_mask(m, (W, S), seg, pre, "cpu")
    assert dense.dtype == torch.bool and dense.shape == (W, 1, S, S)
    ok = ~dense[:, 0]  # True = may attend

    # the block mask the flex backend builds on GPU: its mask_mod on the full index grid, and its kept blocks
    bm = block_mask(seg if document_masking else None, pre, seq_len=S, batch=W)
    grid = bm.mask_mod(
        torch.arange(W).view(W, 1, 1),
        torch.zeros((), dtype=torch.long),
        torch.arange(S).view(1, S, 1),
        torch.arange(S).view(1, 1, S),
    )
    assert torch.equal(grid.expand(W, S, S), ok)
    bq, bk = bm.BLOCK_SIZE
    kept = bm.to_dense()[:, 0].bool().repeat_interleave(bq, 1).repeat_interleave(bk, 2)[:, :S, :S]
    assert not (ok & ~kept).any(), "an allowed pair lies in a block the block mask skips"

    assert out["segment_ids"][0].max() >= 1  # the first window packs several documents
    idx = torch.arange(S)
    for w in range(W):
        for s in range(int(out["segment_ids"][w].max()) + 1):
            where = np.flatnonzero(out["segment_ids"][w] == s)
            a, e = int(where[0]), int(where[-1]) + 1
            sep = a + int(np.flatnonzero(out["tokens"][w][a:e] == sp.sep)[0])
            own = ok[w, a:e, a:e]
            prefix = own[: sep + 1 - a, : sep + 1 - a]
            assert prefix.all(), f"window {w} document {s}: its prefix [{a}, {sep}] is not bidirectional"
            q, k = idx[a:e, None], idx[None, a:e]
            in_prefix = (q <= sep) & (k <= sep)
            assert torch.equal(own, (k <= q) | in_prefix), f"window {w} document {s}: targets not causal"
            assert not ok[w, a:e, e:].any(), f"window {w} document {s} sees a later position"
            if document_masking:
                assert not ok[w, a:e, :a].any(), f"window {w} document {s} sees an earlier document"
            else:
                assert ok[w, a:e, :a].all()  # earlier documents stay visible causally, as in plain packing
