import numpy as np
import pytest
from hypothesis import Phase, given, settings
from hypothesis import strategies as st

from cglab.config import ObjectiveConfig
from cglab.data import contract as C
from cglab.data import objectives as O
from cglab.data.packing import pack_documents
from cglab.data.specials import Specials

# Enough sentinels for every config the strategies below draw (up to ratio 0.9, mean span 1, at seq 160).
SP = Specials.contiguous(1000, 64)
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
    return cfg.corruption == "sequence_level" and objective in (C.SPAN, C.UL2)


cfgs = st.builds(
    lambda kind, corr, lo, width, slo, swidth, p: ObjectiveConfig(
        kind=kind,
        corruption=corr,
        mask_ratio_min=lo,
        mask_ratio_max=min(lo + width, 0.9),
        span_len_min=slo,
        span_len_max=slo + swidth,
        causal_prob=p,
        infill_rate=p,
    ),
    st.sampled_from(KINDS),
    st.sampled_from(["file_level", "sequence_level"]),
    st.floats(0.01, 0.6),
    st.floats(0.0, 0.3),
    st.integers(1, 5),
    st.integers(0, 20),
    st.floats(0.0, 1.0),
)
docs_st = st.lists(st.integers(0, 120), min_size=1, max_size=12)


@settings(max_examples=80, deadline=None)
@given(cfgs, docs_st, st.integers(64, 160), st.integers(0, 2**31))
def test_samples_have_length_s_and_decode_to_their_documents(cfg, lengths, seq_len, seed):
    tokens, segs, out = run(cfg, make_docs(lengths, seed), seq_len, seed)
    W = len(tokens)
    for key, dtype in [
        ("tokens", np.int32),
        ("labels", np.int32),
        ("loss_mask", np.float32),
        ("segment_ids", np.int32),
        ("prefix_end", np.int32),
    ]:
        assert out[key].shape == (W, seq_len) and out[key].dtype == dtype
    assert out["objective"].shape == (W,)
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
    pre = out["prefix_end"]
    assert (pre[seg < 0] == 0).all()  # padding is never a prefix
    for w in range(len(tok)):
        obj, on_w = out["objective"][w], np.flatnonzero(on[w])
        if obj == C.CLM:
            assert np.array_equal(on[w], same[w])
        if obj in (C.CLM, C.INFILL):
            assert (pre[w] == 0).all()
        if obj in (C.SPAN, C.UL2):  # loss only after the unit's <sep>, and on every target token
            for s in range(seg[w].max() + 1):
                where = np.flatnonzero(seg[w] == s)
                sep_at = where[np.flatnonzero(tok[w][where] == SP.sep)[0]]
                assert np.array_equal(on_w[(on_w >= where[0]) & (on_w <= where[-1])], np.arange(sep_at, where[-1]))
                # every unit (each document in file-level mode) is its own prefix: input + <sep>, no further
                assert (pre[w][where] == sep_at + 1).all()
        if obj == C.UL2_S:  # one split per window; each document's prefix stops at its own end
            valid = seg[w] >= 0
            p = pre[w][valid].max(initial=0)
            ends = np.array([np.flatnonzero(seg[w] == g).max() + 1 if g >= 0 else 0 for g in seg[w]])
            assert np.array_equal(pre[w][valid], np.minimum(p, ends[valid]))
            assert (pre[w][~valid] == 0).all()
            assert on_w.size == 0 or on_w.min() >= p - 1


@settings(max_examples=40, deadline=None)
@given(st.lists(st.integers(1, 60), min_size=2, max_size=8), st.integers(0, 2**31), st.integers(1, 12))
def test_file_level_spans_stay_inside_their_document(lengths, seed, span_len_max):
    cfg = ObjectiveConfig(
        kind="span_corruption", mask_ratio_min=0.3, mask_ratio_max=0.6, span_len_min=1, span_len_max=span_len_max
    )
    tokens, segs, out = run(cfg, make_docs(lengths, seed, disjoint=True), 256, seed)
    for w, (tok, seg) in enumerate(zip(out["tokens"], out["segment_ids"])):
        for s, piece in enumerate(originals(tokens[w], segs[w])):
            unit = tok[seg == s]
            sep = np.flatnonzero(unit == SP.sep)[0]
            if piece[-1] == SP.eot:  # the eot stays at the end of the input, never in a span
                assert unit[sep - 1] == SP.eot
            targets = unit[sep + 1 :]
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
            masked = (~np.isin(unit[sep + 1 :], sp.ids())).sum()
            k = np.isin(unit[:sep], sp.masks).sum()
            fr.append(masked / (unit.size - 1 - 3 * k - (unit[sep - 1] == sp.eot)))  # minus <sep>, sentinels, eot
    return np.array(fr)


@pytest.mark.parametrize("corruption", ["file_level", "sequence_level"])
def test_mask_ratio_matches_its_target_on_average(corruption):
    sp = Specials.contiguous(1000, 32)
    cfg = ObjectiveConfig(
        kind="span_corruption",
        corruption=corruption,
        mask_ratio_min=0.05,
        mask_ratio_max=0.35,
        span_len_min=1,
        span_len_max=16,
    )
    docs = make_docs([200] * 1500)
    tokens, segs = pack_documents(docs, 512, sp, O.packing_reserve(cfg), min_piece=201)  # no split pieces
    rngs = [O.sample_rng(7, 0, i) for i in range(len(tokens))]
    out = O.apply_objective_batch(tokens, segs, cfg, sp, rngs, 512)
    fr = masked_fraction(out, sp)
    # Each unit masks exactly round(r n) with r ~ U[0.05, 0.35] (19 spans at most here, within the 32
    # sentinels): the mean is 0.2 with standard error 0.3 / sqrt(12 N); allow 4 standard errors plus
    # the rounding of round(r n) (at most 0.5 / n per unit, n >= 200 maskable tokens).
    tol = 4 * 0.3 / np.sqrt(12 * fr.size) + 0.5 / 200
    assert fr.size > 300
    assert abs(fr.mean() - 0.2) < tol, (fr.mean(), tol)
    assert fr.min() >= 0.05 - 0.5 / 200 and fr.max() <= 0.35 + 0.5 / 200


def test_vectorised_span_corruption_equals_the_plain_python_reference():
    cfg = dict(ratio=(0.05, 0.5), span_len=(1, 9))
    docs = make_docs(np.random.default_rng(3).integers(0, 150, 120))
    ocfg = ObjectiveConfig(
        kind="span_corruption", mask_ratio_min=0.05, mask_ratio_max=0.5, span_len_min=1, span_len_max=9
    )
    tokens, segs = pack_documents(docs, 256, SP, O.packing_reserve(ocfg))
    got = O.span_corruption(tokens, segs, SP, [O.sample_rng(1, 2, i) for i in range(len(tokens))], 256, **cfg)
    want = O.span_corruption_reference(
        tokens.tolist(), segs.tolist(), SP, [O.sample_rng(1, 2, i) for i in range(len(tokens))], 256, **cfg
    )
    assert np.array_equal(got["tokens"], np.array(want, np.int32))


@pytest.mark.parametrize("kind", KINDS)
def test_same_seed_same_sample_new_epoch_new_corruption(kind):
    cfg = ObjectiveConfig(kind=kind, causal_prob=0.5, infill_rate=0.5)
    docs = make_docs(np.random.default_rng(0).integers(10, 100, 40))
    _, _, a = run(cfg, docs, 128, seed=5, epoch=0)
    _, _, b = run(cfg, docs, 128, seed=5, epoch=0)
    _, _, c = run(cfg, docs, 128, seed=5, epoch=1)
    for k in C.FIELDS:
        assert np.array_equal(a[k], b[k])
    if kind != "clm":
        assert not np.array_equal(a["tokens"], c["tokens"])
    else:
        assert np.array_equal(a["tokens"], c["tokens"])


def test_a_sample_does_not_depend_on_its_batch():
    cfg = ObjectiveConfig(kind="ul2")
    tokens, segs = pack_documents(
        make_docs(np.random.default_rng(1).integers(5, 90, 40)), 128, SP, O.packing_reserve(cfg)
    )
    rngs = lambda: [O.sample_rng(0, 0, i) for i in range(len(tokens))]  # noqa: E731
    batch = O.apply_objective_batch(tokens, segs, cfg, SP, rngs(), 128)
    for w, rng in enumerate(rngs()):
        one = O.apply_objective(tokens[w], segs[w], cfg, SP, rng, 128)
        for k in C.FIELDS:
            assert np.array_equal(one[k], batch[k][w])


@pytest.mark.parametrize(
    "kind,prob_field,expect,other",
    [("codegen2", "causal_prob", C.CLM, C.SPAN), ("infill", "infill_rate", C.INFILL, C.CLM)],
)
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
            inp, tgt = t[:sep], t[sep + 1 :]
            m1 = SP.masks[0]
            assert inp[-1] == SP.eot and tgt[-1] == SP.eom and (t == m1).sum() == 2
            if spm:  # <mask_1> suffix eot <sep> prefix <mask_1> middle <eom>
                assert inp[0] == m1
                q = int(np.flatnonzero(tgt == m1)[0])
                prefix, middle, suffix = tgt[:q], tgt[q + 1 : -1], inp[1:]
            else:  # prefix <mask_1> suffix eot <sep> <mask_1> middle <eom>
                assert tgt[0] == m1
                q = int(np.flatnonzero(inp == m1)[0])
                prefix, middle, suffix = inp[:q], tgt[1:-1], inp[q + 1 :]
            assert np.array_equal(np.concatenate([prefix, middle, suffix]), doc)


def test_ul2_uses_all_denoisers_and_prefix_split():
    cfg = ObjectiveConfig(kind="ul2")
    _, _, out = run(cfg, make_docs(np.random.default_rng(0).integers(10, 100, 300)), 128)
    assert set(np.unique(out["objective"])) == {C.UL2, C.UL2_S}
    s = out["objective"] == C.UL2_S
    split = out["prefix_end"][s].max(1)  # earlier documents' prefixes end with them, at or before the split
    assert (split >= 1).all()
    for loss, p in zip(out["loss_mask"][s], split):
        assert (loss[: p - 1] == 0).all() and loss[p - 1 :].sum() > 0


def test_window_packed_without_reserve_is_refused():
    cfg = ObjectiveConfig(kind="span_corruption")
    tokens, segs = pack_documents(make_docs([200]), 64, SP)  # CLM packing: no room for sentinels
    with pytest.raises(ValueError, match="packing_reserve"):
        O.apply_objective(tokens[0], segs[0], cfg, SP, O.sample_rng(0, 0, 0), 64)


def test_bad_inputs_name_the_problem():
    cfg = ObjectiveConfig(
        kind="span_corruption", mask_ratio_min=0.5, mask_ratio_max=0.5, span_len_min=1, span_len_max=1
    )
    tokens, segs = pack_documents(make_docs([10]), 64, SP, O.packing_reserve(cfg))
    # This 10-token document draws 5 spans, but the check is on the 12 a unit can need at 64 tokens (not on the
    # draw), so a short batch cannot hide a tokenizer that a longer one would overrun.
    with pytest.raises(
        ValueError, match="data.num_sentinels: the tokenizer has 11 <mask_k> sentinels but a unit can need 12 spans"
    ):
        O.apply_objective(tokens[0], segs[0], cfg, Specials.contiguous(1000, 11), O.sample_rng(0, 0, 0), 64)
    bad = segs[0].copy()
    bad[0] = 2
    with pytest.raises(ValueError, match="segment_ids"):
        O.apply_objective(tokens[0], bad, cfg, SP, O.sample_rng(0, 0, 0), 64)


# ---------------------------------------------------------------------------------------------- mask ratio at length
BIG_SP = Specials.contiguous(1000, 1024)  # X_dense needs 910 sentinels at 8192


def _corrupting_settings():
    yield "span_corruption", {"kind": "span_corruption"}
    yield "codegen2", {"kind": "codegen2"}  # only its corrupting half has n_maskable > 0
    for d in ObjectiveConfig().ul2_denoisers:  # each UL2 span denoiser alone (prob 1)
        if d.kind == "span":
            yield f"ul2-{d.name}", {"kind": "ul2", "ul2_denoisers": [d.model_dump() | {"prob": 1.0}]}


SETTINGS = dict(_corrupting_settings())


def maskable_per_window(tokens, segs, file_level, sp):
    """The maskable tokens of every packed window, from the window alone: each unit less its final eot."""
    valid = segs >= 0
    last = valid.copy()
    if file_level:  # last token of every document piece
        last[:, :-1] &= segs[:, :-1] != segs[:, 1:]
    else:  # last valid token of the window
        last[:, :-1] &= ~valid[:, 1:]
    return valid.sum(1) - (last & (tokens == sp.eot)).sum(1)


def masked_per_sample(out, sp):
    """Tokens inside spans, read back from the samples: the targets (loss on predicting them) other than the
    `<mask_k>`/`<eom>` the objective adds (a sequence-level span may hold a document's eot)."""
    tok, loss = out["tokens"], out["loss_mask"]
    target = np.zeros_like(tok, bool)
    target[:, 1:] = loss[:, :-1] > 0
    corrupted = np.isin(out["objective"], [C.SPAN, C.UL2])[:, None]
    return (target & corrupted & ~np.isin(tok, [sp.sep, sp.eom, *sp.masks])).sum(1)


@pytest.mark.parametrize("corruption", ["file_level", "sequence_level"])
@pytest.mark.parametrize("setting", sorted(SETTINGS))
@pytest.mark.parametrize("seq_len", [2048, 8192])
@settings(max_examples=2, deadline=None, phases=(Phase.explicit, Phase.reuse, Phase.generate))  # no slow shrinking
@given(seed=st.integers(0, 2**31), shortest=st.integers(50, 500), longest=st.integers(1000, 3000))
def test_realised_mask_fraction_is_the_drawn_ratio_at_real_lengths(
    seq_len, setting, corruption, seed, shortest, longest
):
    """Sum n_masked / sum n_maskable over many packed windows of 50-3000-token documents is the mean drawn ratio
    (within 10% relative), for long sequences too: the span count follows the ratio instead of a cap."""
    cfg = ObjectiveConfig(corruption=corruption, **SETTINGS[setting])
    (cor,) = cfg.corrupting()
    # Enough independent ratio draws that their own spread (sd 0.3 / sqrt(12 N) for U[0.05, 0.35], i.e. 2.2% of
    # the 0.2 mean at N = 400) stays well inside the 10% tolerance; a fixed ratio only has rounding to average.
    units = 400 if cor.ratio[0] < cor.ratio[1] else 40
    per_unit = seq_len if corruption == "sequence_level" else (shortest + longest) / 2
    corrupting_share = 1 - cfg.causal_prob if cfg.kind == "codegen2" else 1.0
    n_tokens = int(units * per_unit / corrupting_share)
    rng = np.random.default_rng(seed)
    lengths = rng.integers(shortest, longest + 1, n_tokens // shortest + 1)
    lengths = lengths[: np.searchsorted(np.cumsum(lengths), n_tokens) + 1]
    docs = [np.append(rng.integers(0, 1000, n), BIG_SP.eot).astype(np.int32) for n in lengths]
    tokens, segs = pack_documents(docs, seq_len, BIG_SP, O.packing_reserve(cfg))
    out = O.apply_objective_batch(
        tokens, segs, cfg, BIG_SP, [O.sample_rng(seed, 0, i) for i in range(len(tokens))], seq_len
    )
    corrupted = out["n_maskable"] > 0
    # the counts are the samples' own: n_masked read back from the tokens, n_maskable from the packed windows
    assert np.array_equal(out["n_masked"], masked_per_sample(out, BIG_SP))
    want = maskable_per_window(tokens, segs, corruption == "file_level", BIG_SP)
    assert np.array_equal(out["n_maskable"][corrupted], want[corrupted])
    assert (out["n_masked"][~corrupted] == 0).all() and (out["objective"][~corrupted] == C.CLM).all()
    realised = out["n_masked"].sum() / out["n_maskable"].sum()
    assert abs(realised - cor.mean_ratio) <= 0.1 * cor.mean_ratio, (realised, cor.mean_ratio)


@settings(max_examples=60, deadline=None)
@given(cfgs, docs_st, st.integers(64, 160), st.integers(0, 2**31))
def test_mask_counts_match_the_samples(cfg, lengths, seq_len, seed):
    tokens, segs, out = run(cfg, make_docs(lengths, seed), seq_len, seed)
    for k in C.COUNTS:
        assert out[k].shape == (len(tokens),) and out[k].dtype == np.int32
    corrupted = np.isin(out["objective"], [C.SPAN, C.UL2])
    assert np.array_equal(out["n_masked"], masked_per_sample(out, SP))
    want = maskable_per_window(tokens, segs, cfg.corruption == "file_level", SP)
    assert np.array_equal(out["n_maskable"], np.where(corrupted, want, 0))  # 0/0 for clm, infill and ul2 S


@settings(max_examples=200, deadline=None)
@given(
    st.lists(st.integers(0, 3000), min_size=1, max_size=20),
    st.floats(0.01, 0.95),
    st.floats(0.0, 0.5),
    st.integers(1, 40),
    st.integers(0, 40),
    st.integers(0, 2**31),
)
def test_spans_hide_exactly_round_r_n_in_span_count_spans(ns, rmin, width, lo, swidth, seed):
    """Per unit: k = span_count(m) spans, each >= 1 token, summing to m = round(r n), disjoint and inside the unit,
    one token apart when that fits."""
    from cglab.config import span_count

    rng = np.random.default_rng(seed)
    n = np.array(ns, np.int64)
    ratio, span_len = (rmin, min(rmin + width, 0.99)), (lo, lo + swidth)
    u = rng.random(n.size)
    m, k = O._mask_counts(n, u, ratio, span_len)
    r = np.minimum(ratio[0] + u * (ratio[1] - ratio[0]), ratio[1])
    assert np.array_equal(m, np.rint(r * n)) and (m <= np.rint(ratio[1] * n)).all()
    assert np.array_equal(k, span_count(m, (span_len[0] + span_len[1]) / 2))
    unit, j, start, length = O._place_spans(n, m, k, rng.random(2 * k.sum()), span_len)
    assert (length >= 1).all()
    assert np.array_equal(np.bincount(unit, weights=length, minlength=n.size), m)
    assert np.array_equal(np.bincount(unit, minlength=n.size), k)
    end = start + length
    assert (start >= 0).all() and (end <= n[unit]).all()
    same = unit[1:] == unit[:-1]
    gap = start[1:][same] - end[:-1][same]
    tight = (n - m - (k - 1) < 0)[unit[1:][same]]  # not enough unmasked tokens to separate every span
    assert (gap >= np.where(tight, 0, 1)).all()


def test_s_denoiser_prefix_never_reaches_a_later_document():
    """UL2's S denoiser splits a packed window once; each document's bidirectional prefix stops at the split or
    at its own end, so even without document masking no token sees a later document's tokens."""
    import torch

    from cglab.config import ModelConfig
    from cglab.model.codegen import batch_mask

    cfg = ObjectiveConfig(kind="ul2", ul2_denoisers=[dict(name="S", prob=1.0, kind="prefix")])
    _, _, out = run(cfg, make_docs([20] * 40), 128, seed=3)
    seg, pre = out["segment_ids"], out["prefix_end"]
    assert (pre.max(1) > 40).any()  # some split lies past the first two documents
    allowed = ~batch_mask(
        ModelConfig(preset="tiny", architecture="prefix_lm", document_masking=False),
        seg.shape,
        torch.as_tensor(seg),
        torch.as_tensor(pre),
    )[:, 0].numpy()
    for w in range(len(seg)):
        q, k = np.nonzero(allowed[w])
        later = (seg[w][k] > seg[w][q]) & (seg[w][q] >= 0)
        assert not later.any(), f"window {w}: a query sees a later document"
        split = pre[w].max()
        inside = np.flatnonzero((seg[w] == seg[w][split - 1]) & (np.arange(128) < split))
        assert allowed[w][np.ix_(inside, inside)].all()  # the split's own document is bidirectional up to it
