"""Mixture: weights per mode, clear errors, deterministic interleave with the configured ratios."""

from __future__ import annotations

import numpy as np
import pytest

from cglab.config import ConfigError
from cglab.data.mixture import interleave, source_weights

KINDS = ["pile", "stack", "stack"]


def test_modes():
    w = [1.0, 3.0, 1.0]
    assert np.allclose(source_weights("weights", KINDS, w), [0.2, 0.6, 0.2])
    assert np.allclose(source_weights("pl_only", KINDS, w), [0.0, 0.75, 0.25])
    assert np.allclose(source_weights("nl_only", KINDS, w), [1.0, 0.0, 0.0])
    assert np.allclose(source_weights("mix", KINDS, w), [0.5, 0.375, 0.125])


def test_errors_name_the_field():
    with pytest.raises(ConfigError, match="data.mixture.*stack"):
        source_weights("pl_only", ["pile"], [1.0])
    with pytest.raises(ConfigError, match="data.mixture.*'mix'"):
        source_weights("mix", ["stack", "stack"], [1.0, 1.0])


def _run(weights, seed, n=(100_000, 100_000, 100_000)):
    streams = [iter(range(k)) for k in n]
    return list(interleave(streams, np.asarray(weights), np.random.default_rng(seed)))


def test_interleave_is_deterministic_and_keeps_order_within_a_source():
    a, b = _run([0.5, 0.3, 0.2], 7)[:5000], _run([0.5, 0.3, 0.2], 7)[:5000]
    assert a == b
    assert a != _run([0.5, 0.3, 0.2], 8)[:5000]
    for s in range(3):
        items = [x for src, x in a if src == s]
        assert items == list(range(len(items)))


def test_interleave_ratio_and_stop_at_first_exhausted():
    out = _run([0.5, 0.5, 0.0], 1, n=(20_000, 5_000, 10))
    counts = np.bincount([s for s, _ in out], minlength=3)
    assert counts[2] == 0  # weight 0: never drawn, never ends the stream
    assert counts[1] == 5_000  # the smaller source ran dry, which ends the stream
    assert abs(counts[0] / counts.sum() - 0.5) < 0.02


def _docs(lengths, seed):
    """A stream of token-id arrays with the given lengths, in a seeded random order."""
    rng = np.random.default_rng(seed)
    return iter([np.zeros(int(n), np.int32) for n in rng.permutation(lengths)])


@pytest.mark.parametrize("weights", [[0.5, 0.5], [0.2, 0.8], [0.9, 0.1]])
def test_interleave_by_tokens_gives_each_source_its_share_of_tokens_at_every_prefix(weights):
    """Documents 20x longer in one source (code files ~6,000 tokens, NL ~300): mixed by tokens, every prefix of the
    stream past a few long documents holds each source's share of the tokens to within 3%, and the stream ends when
    a source runs dry. Mixed by documents, the same weights are far from it."""
    rng = np.random.default_rng(0)
    nl = rng.integers(150, 450, 4000)  # ~300 tokens
    code = rng.integers(3000, 9000, 400)  # ~6,000 tokens
    out = list(interleave([_docs(nl, 1), _docs(code, 2)], np.asarray(weights), None, size=lambda d: d.size))
    src = np.array([s for s, _ in out])
    tok = np.array([d.size for _, d in out], float)
    cum = np.cumsum(tok[:, None] * (src[:, None] == np.arange(2)), axis=0)
    frac = cum[:, 0] / cum.sum(1)
    later = cum.sum(1) >= 200_000  # from ~25 code files on
    assert later.any() and np.abs(frac[later] - weights[0]).max() <= 0.03
    assert (src == 0).sum() == len(nl) or (src == 1).sum() == len(code)  # one source read to its end
    by_docs = list(interleave([_docs(nl, 1), _docs(code, 2)], np.asarray(weights), np.random.default_rng(3)))
    d_src = np.array([s for s, _ in by_docs])
    d_tok = np.array([d.size for _, d in by_docs], float)
    assert abs(d_tok[d_src == 0].sum() / d_tok.sum() - weights[0]) > 0.1
