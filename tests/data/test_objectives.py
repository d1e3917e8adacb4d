import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from cglab.config import ObjectiveConfig
from cglab.data import objectives as O
from cglab.data.packing import Reserve, pack_documents
from cglab.data.specials import Specials

SP = Specials.contiguous(1000, 16)
SPECIAL_IDS = SP.ids()
KINDS = ["clm", "span_corruption", "codegen2", "infill", "ul2"]


def make_docs(lengths, seed=0, disjoint=False):
    """Documents of non-special tokens; with disjoint=True doc i only uses tokens [10 i, 10 i + 10)."""
    rng = np.random.default_rng(seed)
    docs = []
    for i, n in enumerate(lengths):
        body = 10 * i + rng.integers(0, 10, n) if disjoint else rng.integers(0, 1000, n)
        docs.append(np.append(body, SP.eot).astype(np.int32))
    return docs


def run(cfg, docs, seq_len, seed=0, epoch=0):
    tokens, segs = pack_documents(docs, seq_len, SP, O.packing_reserve(cfg))
    rngs = [O.sample_rng(seed, epoch, i) for i in range(len(tokens))]
    return tokens, segs, O.apply_objective_batch(tokens, segs, cfg, SP, rngs, seq_len)


def originals(tokens, segs):
    return [tokens[segs == s] for s in range(segs.max(initial=-1) + 1)]


def is_sequence_level_corruption(cfg, objective):
    return cfg.corruption == "sequence_level" and objective in (O.SPAN, O.UL2)


cfgs = st.builds(
    lambda kind, corr, lo, width, slo, swidth, spans, p: ObjectiveConfig(
        kind=kind, corruption=corr, mask_ratio_min=lo, mask_ratio_max=min(lo + width, 0.9),
        span_len_min=slo, span_len_max=slo + swidth, max_spans=spans, causal_prob=p, infill_rate=p),
    st.sampled_from(KINDS), st.sampled_from(["file_level", "sequence_level"]),
    st.floats(0.01, 0.6), st.floats(0.0, 0.3), st.integers(1, 5), st.integers(0, 20), st.integers(1, 16),
    st.floats(0.0, 1.0))
docs_st = st.lists(st.integers(0, 120), min_size=1, max_size=12)


@settings(max_examples=80, deadline=None)
@given(cfgs, docs_st, st.integers(64, 160), st.integers(0, 2**31))
def test_samples_have_length_s_and_decode_to_their_documents(cfg, lengths, seq_len, seed):
    tokens, segs, out = run(cfg, make_docs(lengths, seed), seq_len, seed)
    W = len(tokens)
    for key, dtype in [("tokens", np.int32), ("labels", np.int32), ("loss_mask", np.float32),
                       ("segment_ids", np.int32)]:
        assert out[key].shape == (W, seq_len) and out[key].dtype == dtype
    assert out["prefix_len"].shape == (W,) and out["objective"].shape == (W,)
    for w in range(W):
        got = O.reconstruct(out["tokens"][w], out["segment_ids"][w], SP)
        want = originals(tokens[w], segs[w])
        if is_sequence_level_corruption(cfg, out["objective"][w]):
            want = [np.concatenate(want)]
        assert len(got) == len(want)
        for g, x in zip(got, want):
            assert np.array_equal(g, x)


@settings(max_examples=60, deadline=None)
@given(cfgs, docs_st, st.integers(64, 160), st.integers(0, 2**31))
def test_labels_and_loss_mask_are_consistent(cfg, lengths, seq_len, seed):
    _, _, out = run(cfg, make_docs(lengths, seed), seq_len, seed)
    tok, lab, loss, seg = out["tokens"], out["labels"], out["loss_mask"], out["segment_ids"]
    same = np.zeros_like(seg, bool)
    same[:, :-1] = (seg[:, 1:] == seg[:, :-1]) & (seg[:, :-1] >= 0)
    on = loss > 0
    assert set(np.unique(loss)) <= {0.0, 1.0}
    assert not (on & ~same).any()  # never across a boundary, never on padding, never the last position
    assert (lab[:, :-1][same[:, :-1]] == tok[:, 1:][same[:, :-1]]).all()
    assert (tok[seg < 0] == SP.pad).all() and (loss[seg < 0] == 0).all()
    for w in range(len(tok)):
        obj, on_w = out["objective"][w], np.flatnonzero(on[w])
        if obj == O.CLM:
            assert np.array_equal(on[w], same[w])
        if obj in (O.SPAN, O.UL2):  # loss only after the unit's <sep>, and on every target token
            for s in range(seg[w].max() + 1):
                where = np.flatnonzero(seg[w] == s)
                sep_at = where[np.flatnonzero(tok[w][where] == SP.sep)[0]]
                assert np.array_equal(on_w[(on_w >= where[0]) & (on_w <= where[-1])],
                                      np.arange(sep_at, where[-1]))
            assert tok[w][out["prefix_len"][w] - 1] == SP.sep
        if obj == O.UL2_S:
            assert on_w.size == 0 or on_w.min() >= out["prefix_len"][w] - 1


@settings(max_examples=40, deadline=None)
@given(st.lists(st.integers(1, 60), min_size=2, max_size=8), st.integers(0, 2**31), st.integers(1, 12))
def test_file_level_spans_stay_inside_their_document(lengths, seed, max_spans):
    cfg = ObjectiveConfig(kind="span_corruption", mask_ratio_min=0.3, mask_ratio_max=0.6, max_spans=max_spans,
                          span_len_min=1, span_len_max=6)
    tokens, segs, out = run(cfg, make_docs(lengths, seed, disjoint=True), 256, seed)
    for w, (tok, seg) in enumerate(zip(out["tokens"], out["segment_ids"])):
        for s, piece in enumerate(originals(tokens[w], segs[w])):
            unit = tok[seg == s]
            sep = np.flatnonzero(unit == SP.sep)[0]
            if piece[-1] == SP.eot:  # the eot stays at the end of the input, never in a span
                assert unit[sep - 1] == SP.eot
            targets = unit[sep + 1:]
            text = targets[~np.isin(targets, SPECIAL_IDS)]
            # every masked token comes from this segment's own document (documents use disjoint alphabets)
            assert np.isin(text // 10, piece[piece != SP.eot] // 10).all()
            assert (unit == SP.eot).sum() == (piece == SP.eot).sum()


def masked_fraction(out, sp):
    """Per unit: masked tokens / maskable tokens, read back from the samples."""
    fr = []
    for tok, seg in zip(out["tokens"], out["segment_ids"]):
        for s in range(seg.max() + 1):
            unit = tok[seg == s]
            sep = np.flatnonzero(unit == SP.sep)[0]
            masked = (~np.isin(unit[sep + 1:], sp.ids())).sum()
            k = np.isin(unit[:sep], sp.masks).sum()
            fr.append(masked / (unit.size - 1 - 3 * k - (unit[sep - 1] == sp.eot)))  # minus <sep>, sentinels, eot
    return np.array(fr)


@pytest.mark.parametrize("corruption", ["file_level", "sequence_level"])
def test_mask_ratio_matches_its_target_on_average(corruption):
    sp = Specials.contiguous(1000, 32)
    cfg = ObjectiveConfig(kind="span_corruption", corruption=corruption, mask_ratio_min=0.05,
                          mask_ratio_max=0.35, span_len_min=1, span_len_max=16, max_spans=32)
    docs = make_docs([200] * 1500)
    tokens, segs = pack_documents(docs, 512, sp, O.packing_reserve(cfg), min_piece=201)  # no split pieces
    rngs = [O.sample_rng(7, 0, i) for i in range(len(tokens))]
    out = O.apply_objective_batch(tokens, segs, cfg, sp, rngs, 512)
    fr = masked_fraction(out, sp)
    # 32 spans of mean length 8.5 never cap a 35% target on <= 480 tokens, so each unit masks round(r n) with
    # r ~ U[0.05, 0.35]: the mean is 0.2 with standard error 0.3 / sqrt(12 N); allow 4 standard errors plus
    # the rounding of round(r n) (at most 0.5 / n per unit, n >= 200 maskable tokens).
    tol = 4 * 0.3 / np.sqrt(12 * fr.size) + 0.5 / 200
    assert fr.size > 300
    assert abs(fr.mean() - 0.2) < tol, (fr.mean(), tol)
    assert fr.min() >= 0.05 - 0.5 / 200 and fr.max() <= 0.35 + 0.5 / 200


def test_vectorised_span_corruption_equals_the_plain_python_reference():
    cfg = dict(ratio=(0.05, 0.5), span_len=(1, 9), max_spans=6)
    docs = make_docs(np.random.default_rng(3).integers(0, 150, 120))
    tokens, segs = pack_documents(docs, 256, SP, Reserve(per_doc=1 + 3 * 6))
    got = O.span_corruption(tokens, segs, SP, [O.sample_rng(1, 2, i) for i in range(len(tokens))], 256, **cfg)
    want = O.span_corruption_reference(tokens.tolist(), segs.tolist(), SP,
                                       [O.sample_rng(1, 2, i) for i in range(len(tokens))], 256, **cfg)
    assert np.array_equal(got["tokens"], np.array(want, np.int32))


@pytest.mark.parametrize("kind", KINDS)
def test_same_seed_same_sample_new_epoch_new_corruption(kind):
    cfg = ObjectiveConfig(kind=kind, causal_prob=0.5, infill_rate=0.5)
    docs = make_docs(np.random.default_rng(0).integers(10, 100, 40))
    _, _, a = run(cfg, docs, 128, seed=5, epoch=0)
    _, _, b = run(cfg, docs, 128, seed=5, epoch=0)
    _, _, c = run(cfg, docs, 128, seed=5, epoch=1)
    for k in O.FIELDS:
        assert np.array_equal(a[k], b[k])
    if kind != "clm":
        assert not np.array_equal(a["tokens"], c["tokens"])
    else:
        assert np.array_equal(a["tokens"], c["tokens"])


def test_a_sample_does_not_depend_on_its_batch():
    cfg = ObjectiveConfig(kind="ul2")
    tokens, segs = pack_documents(make_docs(np.random.default_rng(1).integers(5, 90, 40)), 128, SP,
                                  O.packing_reserve(cfg))
    rngs = lambda: [O.sample_rng(0, 0, i) for i in range(len(tokens))]  # noqa: E731
    batch = O.apply_objective_batch(tokens, segs, cfg, SP, rngs(), 128)
    for w, rng in enumerate(rngs()):
        one = O.apply_objective(tokens[w], segs[w], cfg, SP, rng, 128)
        for k in O.FIELDS:
            assert np.array_equal(one[k], batch[k][w])


@pytest.mark.parametrize("kind,prob_field,expect,other", [("codegen2", "causal_prob", O.CLM, O.SPAN),
                                                          ("infill", "infill_rate", O.INFILL, O.CLM)])
def test_mixture_rate_matches_its_probability(kind, prob_field, expect, other):
    cfg = ObjectiveConfig(kind=kind, **{prob_field: 0.3})
    tokens, segs = pack_documents(make_docs([20] * 4000), 64, SP, O.packing_reserve(cfg))
    out = O.apply_objective_batch(tokens, segs, cfg, SP, [O.sample_rng(0, 0, i) for i in range(len(tokens))], 64)
    rate = (out["objective"] == expect).mean()
    # Binomial: 5 standard errors of p = 0.3 over the windows.
    assert abs(rate - 0.3) < 5 * np.sqrt(0.3 * 0.7 / len(tokens))
    assert set(np.unique(out["objective"])) == {other, expect}


def test_infill_layouts_psm_and_spm():
    doc = make_docs([40])[0]
    for spm_prob, spm in [(0.0, False), (1.0, True)]:
        cfg = ObjectiveConfig(kind="infill", infill_rate=1.0, spm_prob=spm_prob)
        tokens, segs = pack_documents([doc], 64, SP, O.packing_reserve(cfg))
        for i in range(20):
            t = O.apply_objective(tokens[0], segs[0], cfg, SP, O.sample_rng(0, 0, i), 64)["tokens"]
            t = t[t != SP.pad]
            sep = int(np.flatnonzero(t == SP.sep)[0])
            inp, tgt = t[:sep], t[sep + 1:]
            m1 = SP.masks[0]
            assert inp[-1] == SP.eot and tgt[-1] == SP.eom and (t == m1).sum() == 2
            if spm:  # <mask_1> suffix eot <sep> prefix <mask_1> middle <eom>
                assert inp[0] == m1
                q = int(np.flatnonzero(tgt == m1)[0])
                prefix, middle, suffix = tgt[:q], tgt[q + 1:-1], inp[1:]
            else:  # prefix <mask_1> suffix eot <sep> <mask_1> middle <eom>
                assert tgt[0] == m1
                q = int(np.flatnonzero(inp == m1)[0])
                prefix, middle, suffix = inp[:q], tgt[1:-1], inp[q + 1:]
            assert np.array_equal(np.concatenate([prefix, middle, suffix]), doc)


def test_ul2_uses_all_denoisers_and_prefix_split():
    cfg = ObjectiveConfig(kind="ul2")
    _, _, out = run(cfg, make_docs(np.random.default_rng(0).integers(10, 100, 300)), 128)
    assert set(np.unique(out["objective"])) == {O.UL2, O.UL2_S}
    s = out["objective"] == O.UL2_S
    assert (out["prefix_len"][s] >= 1).all()
    for loss, p in zip(out["loss_mask"][s], out["prefix_len"][s]):
        assert (loss[:p - 1] == 0).all() and loss[p - 1:].sum() > 0


def test_window_packed_without_reserve_is_refused():
    cfg = ObjectiveConfig(kind="span_corruption")
    tokens, segs = pack_documents(make_docs([200]), 64, SP)  # CLM packing: no room for sentinels
    with pytest.raises(ValueError, match="packing_reserve"):
        O.apply_objective(tokens[0], segs[0], cfg, SP, O.sample_rng(0, 0, 0), 64)


def test_bad_inputs_name_the_problem():
    cfg = ObjectiveConfig(kind="span_corruption", max_spans=8)
    tokens, segs = pack_documents(make_docs([10]), 64, SP, O.packing_reserve(cfg))
    with pytest.raises(ValueError, match="num_sentinels"):
        O.apply_objective(tokens[0], segs[0], cfg, Specials.contiguous(1000, 4), O.sample_rng(0, 0, 0), 64)
    bad = segs[0].copy()
    bad[0] = 2
    with pytest.raises(ValueError, match="segment_ids"):
        O.apply_objective(tokens[0], bad, cfg, SP, O.sample_rng(0, 0, 0), 64)
