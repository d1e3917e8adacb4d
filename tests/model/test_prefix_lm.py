"""The paper's Prefix-LM on causal-LM samples (model.architecture=prefix_lm): every packed document draws its own
split; through the mask the model gets, its prefix is bidirectional and carries no loss, the rest is causal with
loss, and nothing reaches another document. Under model.architecture=causal nothing changes."""

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from cglab.config import ModelConfig, ObjectiveConfig
from cglab.data import contract as C
from cglab.data import objectives as O
from cglab.data.packing import pack_documents
from cglab.data.specials import Specials
from cglab.model.codegen import batch_mask

SP = Specials.contiguous(1000, 128)


def _samples(kind, lengths, seq_len, seed, architecture):
    rng = np.random.default_rng(seed)
    docs = [np.append(rng.integers(0, 1000, n), SP.eot).astype(np.int32) for n in lengths]
    cfg = ObjectiveConfig(kind=kind, causal_prob=0.5, mask_ratio_max=0.3, span_len_max=8)
    windows, wsegs = pack_documents(docs, seq_len, SP, O.packing_reserve(cfg))
    rngs = [O.sample_rng(seed, 0, i) for i in range(len(windows))]
    return O.apply_objective_batch(windows, wsegs, cfg, SP, rngs, seq_len, architecture)


def _allowed(out, document_masking):
    seg, pre = torch.from_numpy(out["segment_ids"]).long(), torch.from_numpy(out["prefix_end"]).long()
    m = ModelConfig(architecture="prefix_lm", document_masking=document_masking, attention_backend="sdpa")
    return (~batch_mask(m, tuple(seg.shape), seg, pre, "cpu")[:, 0]).numpy()


def _check_documents(out, document_masking):
    """Per causal-LM sample and per document [a, e): the keys each query sees and the loss it carries."""
    ok = _allowed(out, document_masking)
    S = out["tokens"].shape[1]
    idx = np.arange(S)
    split = 0  # documents whose prefix opens at least one future key
    for w in np.flatnonzero(out["objective"] == C.CLM):
        seg = out["segment_ids"][w]
        for s in range(int(seg.max(initial=-1)) + 1):
            where = np.flatnonzero(seg == s)
            a, e = int(where[0]), int(where[-1]) + 1
            assert np.array_equal(where, np.arange(a, e))
            p = int(out["prefix_end"][w][a]) - a if out["prefix_end"][w][a] else 0
            assert (out["prefix_end"][w][a:e] == out["prefix_end"][w][a]).all(), "one prefix per document"
            assert 0 <= p < max(e - a, 2), f"window {w} doc {s}: prefix {p} of a {e - a}-token document"
            q, k = idx[a:e, None], idx[None, a:e]
            want = (k <= q) | ((q < a + p) & (k < a + p))  # bidirectional on [a, a+p), causal after
            assert np.array_equal(ok[w, a:e, a:e], want), f"window {w} doc {s}: not the prefix-LM mask"
            outside = np.ones(S, bool)
            outside[a:e] = False
            seen = ok[w, a:e][:, outside]
            if document_masking:
                assert not seen.any(), f"window {w} doc {s}: attention crosses documents"
            else:  # without document masking only earlier tokens, never a later document
                assert not seen[:, idx[outside] >= e].any(), f"window {w} doc {s}: sees a later document"
            # loss: 0 exactly where the position sees a later token (the prefix), 1 on the rest but the last token
            # (no next token in the document)
            sees_future = ok[w, a:e, a:e] & (k > q)
            loss = out["loss_mask"][w][a:e]
            assert np.array_equal(loss[:-1] == 0, sees_future.any(1)[:-1]), f"window {w} doc {s}: prefix loss"
            assert loss[-1] == 0 and (loss[max(p - 1, 0) : -1] == 1).all()
            split += bool(sees_future.any())
    return split


@settings(max_examples=40, deadline=None)
@given(
    kind=st.sampled_from(["clm", "codegen2"]),
    lengths=st.lists(st.integers(0, 90), min_size=1, max_size=12),
    seq_len=st.integers(32, 160),
    seed=st.integers(0, 2**31),
    document_masking=st.booleans(),
)
def test_each_packed_document_of_a_causal_sample_is_its_own_prefix_lm(kind, lengths, seq_len, seed, document_masking):
    out = _samples(kind, lengths, seq_len, seed, "prefix_lm")
    _check_documents(out, document_masking)


@pytest.mark.parametrize("document_masking", [True, False])
def test_prefix_lm_at_sequence_2048(document_masking):
    """Real lengths: documents of tens to thousands of tokens, split across windows too."""
    lengths = np.random.default_rng(5).integers(10, 3000, 12).tolist()
    out = _samples("clm", lengths, 2048, seed=7, architecture="prefix_lm")
    assert (out["segment_ids"].max(1) >= 1).all() or len(out["tokens"]) > 1
    assert _check_documents(out, document_masking) >= 10  # nearly every document really is split


def test_splits_are_drawn_per_document_not_per_window():
    """Documents of one window get different prefix lengths (a window-wide split would end the prefix of all but
    one document at the document's own end or give it none)."""
    out = _samples("clm", [40] * 30, 256, seed=1, architecture="prefix_lm")
    fractions = []
    for w in range(len(out["tokens"])):
        seg = out["segment_ids"][w]
        for s in range(int(seg.max()) + 1):
            a = int(np.flatnonzero(seg == s)[0])
            fractions.append((int(out["prefix_end"][w][a]) - a) / int((seg == s).sum()))
    assert len(set(fractions)) > len(fractions) // 2  # varied, not one per window
    assert 0.3 < np.mean(fractions) < 0.7  # uniform on [1, n-1]: about half of each document


def test_causal_architecture_leaves_samples_unchanged_and_prefix_lm_changes_only_causal_samples():
    """model.architecture=causal: causal-LM samples are the plain ones (no prefix, loss on every in-document
    target). prefix_lm: the span-corrupted samples of the codegen2 mix are bit-identical to causal's (the split is
    drawn after them from the window's own generator), only the causal-LM ones change."""
    lengths = np.random.default_rng(2).integers(1, 200, 60).tolist()
    causal = _samples("codegen2", lengths, 128, seed=4, architecture="causal")
    prefix = _samples("codegen2", lengths, 128, seed=4, architecture="prefix_lm")
    clm = causal["objective"] == C.CLM
    assert clm.any() and (~clm).any()
    assert np.array_equal(causal["objective"], prefix["objective"])
    for k in C.SAMPLE_KEYS:
        assert np.array_equal(causal[k][~clm], prefix[k][~clm]), k
    seg = causal["segment_ids"][clm]
    assert (causal["prefix_end"][clm] == 0).all()
    plain = np.zeros(seg.shape, np.float32)
    plain[:, :-1] = (seg[:, 1:] == seg[:, :-1]) & (seg[:, :-1] >= 0)
    assert np.array_equal(causal["loss_mask"][clm], plain)
    assert np.array_equal(causal["tokens"][clm], prefix["tokens"][clm])
    assert prefix["loss_mask"][clm].sum() < 0.75 * plain.sum()  # the prefixes carry no loss


def test_an_unknown_architecture_is_refused():
    with pytest.raises(ValueError, match="model.architecture"):
        _samples("clm", [10], 32, 0, "encoder")
