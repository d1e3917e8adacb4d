import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cglab.config import ObjectiveConfig
from cglab.data import objectives as O
from cglab.data.packing import Packer, Reserve, pack_documents
from cglab.data.specials import Specials

SP = Specials.contiguous(1000, 8)


def make_docs(lengths, seed=0):
    rng = np.random.default_rng(seed)
    return [np.append(rng.integers(0, 1000, n), SP.eot).astype(np.int32) for n in lengths]


def pieces(tokens, segs):
    """Every (window, segment) token run, in order."""
    out = []
    for t, s in zip(tokens, segs):
        out += [t[s == i] for i in range(s.max(initial=-1) + 1)]
    return out


doc_lengths = st.lists(st.integers(0, 150), min_size=0, max_size=25)
# per_token: none, span corruption's usual fractions (3 rmax / mean span) and a non-dyadic one
reserves = st.builds(
    Reserve, st.integers(0, 10), st.integers(0, 10), st.sampled_from([0.0, 3 * 0.35 / 8.5, 0.5, 1 / 3, 1.0])
)


@settings(max_examples=60, deadline=None)
@given(doc_lengths, st.integers(24, 96), reserves)
def test_windows_hold_the_stream_within_budget(lengths, seq_len, reserve):
    docs = make_docs(lengths)
    tokens, segs = pack_documents(docs, seq_len, SP, reserve)
    assert tokens.shape == segs.shape and tokens.shape[1:] == (seq_len,)
    assert tokens.dtype == np.int32 and segs.dtype == np.int32
    # the stream comes back exactly, in order
    flat = np.concatenate(pieces(tokens, segs)) if len(tokens) else np.zeros(0, np.int32)
    assert np.array_equal(flat, np.concatenate(docs) if docs else flat)
    for t, s in zip(tokens, segs):
        valid = s >= 0
        n_valid, n_pieces = int(valid.sum()), int(s.max(initial=-1)) + 1
        assert n_valid > 0
        assert valid[:n_valid].all() and not valid[n_valid:].any()  # content first, then padding
        assert (t[~valid] == SP.pad).all()
        assert np.array_equal(np.unique(s[valid]), np.arange(n_pieces))
        assert (np.diff(s[valid]) >= 0).all()
        assert n_valid * (1 + reserve.per_token) + reserve.per_doc * n_pieces + reserve.per_window <= seq_len + 1e-9


@settings(max_examples=40, deadline=None)
@given(doc_lengths, st.integers(24, 96), reserves)
def test_every_window_but_the_last_is_full(lengths, seq_len, reserve):
    """Greedy: a window closes only when not even one more token (plus its reserve) fits."""
    tokens, segs = pack_documents(make_docs(lengths), seq_len, SP, reserve)
    g = 1 + reserve.per_token
    for s in segs[:-1]:
        cost = (s >= 0).sum() * g + reserve.per_doc * (s.max() + 1) + reserve.per_window
        assert cost + reserve.per_doc + g > seq_len - 1e-9


@settings(max_examples=40, deadline=None)
@given(doc_lengths, st.integers(24, 96), reserves, st.lists(st.integers(0, 25), max_size=5))
def test_streaming_is_independent_of_batching(lengths, seq_len, reserve, cuts):
    docs = make_docs(lengths)
    whole = pack_documents(docs, seq_len, SP, reserve)
    packer = Packer(seq_len, SP, reserve)
    got_t, got_s = [], []
    bounds = [0, *sorted(c for c in cuts if c <= len(docs)), len(docs)]
    for a, b in zip(bounds[:-1], bounds[1:]):
        t, s = packer.add(docs[a:b])
        got_t.append(t)
        got_s.append(s)
    t, s = packer.flush()
    assert np.array_equal(np.concatenate(got_t + [t]), whole[0])
    assert np.array_equal(np.concatenate(got_s + [s]), whole[1])


def test_long_document_is_split_and_only_its_last_piece_has_eot():
    docs = make_docs([250, 5])
    tokens, segs = pack_documents(docs, 64, SP, Reserve(per_doc=4))
    runs = pieces(tokens, segs)
    assert len(runs) >= 5  # 251 tokens at <= 60 per window, then the small doc
    assert [r[-1] == SP.eot for r in runs].count(True) == 2
    assert np.array_equal(np.concatenate(runs[:-1]), docs[0])
    assert all(len(r) <= 60 for r in runs)


def test_bad_documents_are_skipped_and_counted():
    packer = Packer(32, SP)
    good = make_docs([3])[0]
    tokens, _ = packer.add([np.zeros(0, np.int32), np.array([1, 2, 3]), good])
    tokens, segs = packer.flush()
    assert packer.stats.skipped_empty == 1 and packer.stats.skipped_no_eot == 1
    assert packer.stats.docs == 1 and packer.stats.tokens == 4
    assert np.array_equal(tokens[0][segs[0] >= 0], good)


def test_reserve_larger_than_window_is_refused():
    with pytest.raises(ValueError, match="data.seq_length"):
        Packer(16, SP, Reserve(per_window=10, per_doc=6))


def _corrupting_configs():
    """Every objective that corrupts spans, with the default settings, each UL2 span denoiser on its own, and
    the config corners where the reserve's bound is tightest (dense ratio, one-token spans)."""
    out = {
        "span_corruption": dict(kind="span_corruption"),
        "codegen2": dict(kind="codegen2"),
        "ul2": dict(kind="ul2"),
        "dense-1tok": dict(
            kind="span_corruption", mask_ratio_min=0.9, mask_ratio_max=0.9, span_len_min=1, span_len_max=1
        ),
    }
    for d in ObjectiveConfig().ul2_denoisers:
        if d.kind == "span":
            out[f"ul2-{d.name}"] = dict(kind="ul2", ul2_denoisers=[d.model_dump() | {"prob": 1.0}])
    return out


CORRUPTING = _corrupting_configs()
BIG_SP = Specials.contiguous(1000, 1024)


@settings(max_examples=30, deadline=None)
@given(
    st.sampled_from(sorted(CORRUPTING)),
    st.sampled_from(["file_level", "sequence_level"]),
    st.lists(st.integers(0, 3000), min_size=1, max_size=40),
    st.integers(0, 2**31),
)
def test_no_window_overflows_under_the_objective_reserve(name, corruption, lengths, seed):
    """Packed with packing_reserve(cfg), every sample fits in 2048 tokens (_assemble raises otherwise)."""
    cfg = ObjectiveConfig(corruption=corruption, **CORRUPTING[name])
    rng = np.random.default_rng(seed)
    docs = [np.append(rng.integers(0, 1000, n), BIG_SP.eot).astype(np.int32) for n in lengths]
    tokens, segs = pack_documents(docs, 2048, BIG_SP, O.packing_reserve(cfg))
    for epoch in range(3):  # fresh draws of the same windows
        rngs = [O.sample_rng(seed, epoch, i) for i in range(len(tokens))]
        out = O.apply_objective_batch(tokens, segs, cfg, BIG_SP, rngs, 2048)
        assert out["tokens"].shape == (len(tokens), 2048)


@settings(max_examples=60, deadline=None)
@given(
    st.floats(0.01, 0.95),
    st.floats(0.0, 0.5),
    st.integers(1, 40),
    st.integers(0, 40),
    st.sampled_from(["file_level", "sequence_level"]),
)
def test_reserve_bounds_what_any_unit_adds(rmin, width, lo, swidth, corruption):
    """For every unit size up to 8192 and the largest m a draw can give, 1 + 3 span_count(m) <= c + f n."""
    from cglab.config import span_count

    cfg = ObjectiveConfig(
        kind="span_corruption",
        corruption=corruption,
        mask_ratio_min=rmin,
        mask_ratio_max=min(rmin + width, 0.99),
        span_len_min=lo,
        span_len_max=lo + swidth,
    )
    res = O.packing_reserve(cfg)
    c = res.per_doc if corruption == "file_level" else res.per_window
    n = np.arange(8193)
    k = span_count(np.rint(cfg.mask_ratio_max * n).astype(np.int64), (lo + lo + swidth) / 2)
    assert (1 + 3 * k <= c + res.per_token * n).all()
    assert res.per_doc * res.per_window == 0  # the unit is a document piece or the window, never both


@settings(max_examples=60, deadline=None)
@given(
    doc_lengths,
    st.integers(24, 96),
    st.lists(reserves, min_size=1, max_size=4),
    st.integers(0, 2**31),
    st.lists(st.integers(0, 25), max_size=5),
)
def test_each_window_packs_with_its_own_reserve(lengths, seq_len, options, seed, cuts):
    """reserve_for(w): window w holds what fits under its own reserve (within budget and greedy: not one more
    token fits), the stream comes back exactly, and the windows do not depend on how the documents are batched."""
    choice = np.random.default_rng(seed).integers(0, len(options), 1000)
    reserve_for = lambda w: options[choice[w]]  # noqa: E731
    docs = make_docs(lengths)
    tokens, segs = pack_documents(docs, seq_len, SP, options[0], reserve_for=reserve_for)
    flat = np.concatenate(pieces(tokens, segs)) if len(tokens) else np.zeros(0, np.int32)
    assert np.array_equal(flat, np.concatenate(docs) if docs else flat)
    for w, s in enumerate(segs):
        r = options[choice[w]]
        g = 1 + r.per_token
        cost = (s >= 0).sum() * g + r.per_doc * (s.max() + 1) + r.per_window
        assert cost <= seq_len + 1e-9
        if w < len(segs) - 1:
            assert cost + r.per_doc + g > seq_len - 1e-9
    packer = Packer(seq_len, SP, options[0], reserve_for=reserve_for)
    got = []
    bounds = [0, *sorted(c for c in cuts if c <= len(docs)), len(docs)]
    for a, b in zip(bounds[:-1], bounds[1:]):
        got.append(packer.add(docs[a:b])[1])
    got.append(packer.flush()[1])
    assert np.array_equal(np.concatenate(got), segs)
