import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

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
reserves = st.builds(Reserve, st.integers(0, 10), st.integers(0, 10))


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
        assert n_valid + reserve.per_doc * n_pieces + reserve.per_window <= seq_len


@settings(max_examples=40, deadline=None)
@given(doc_lengths, st.integers(24, 96), reserves)
def test_every_window_but_the_last_is_full(lengths, seq_len, reserve):
    """Greedy: a window closes only when not even one more token (plus its reserve) fits."""
    tokens, segs = pack_documents(make_docs(lengths), seq_len, SP, reserve)
    for s in segs[:-1]:
        cost = (s >= 0).sum() + reserve.per_doc * (s.max() + 1) + reserve.per_window
        assert cost + reserve.per_doc + 1 > seq_len


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
