"""Sharding by construction (issue 14): each DP rank's Ray Data dataset holds only its own units of work, the
ranks' samples partition the dp=1 stream for any dp_size, and a resumed rank skips whole units without opening
them."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cglab.config import ConfigError, from_dict
from cglab.data import pipeline

S = 64
UNITS = 6  # files per source in this module's corpus: six units of work


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(1, 10**9), min_size=1, max_size=40), st.integers(1, 12))
def test_balance_is_a_balanced_partition(sizes, dp):
    if len(sizes) < dp:
        with pytest.raises(ConfigError, match="parallel.data_parallel_size"):
            pipeline.balance(sizes, 0, dp)
        return
    shares = [pipeline.balance(sizes, r, dp) for r in range(dp)]
    flat = [u for s in shares for u in s]
    assert sorted(flat) == list(range(len(sizes)))  # every unit exactly once
    assert all(s == sorted(s) and s for s in shares)  # stream order inside a rank; nobody empty
    loads = [sum(sizes[u] for u in s) for s in shares]
    assert max(loads) - min(loads) <= max(sizes)  # longest-first: within one unit of even
    assert shares == [pipeline.balance(sizes, r, dp) for r in range(dp)]  # pure


@given(st.lists(st.integers(0, 3), max_size=60), st.integers(1, 7))
def test_unit_indices_count_inside_each_run_of_a_unit_across_calls(units, cut):
    units = sorted(units)  # a stream visits a unit's samples contiguously
    a = np.array(units, np.int32)
    whole, _, _ = pipeline.unit_indices(a, -1, 0)
    parts, cur, count = [], -1, 0
    for i in range(0, len(a), cut):
        idx, cur, count = pipeline.unit_indices(a[i : i + cut], cur, count)
        parts.append(idx)
    assert np.array_equal(np.concatenate(parts) if parts else np.zeros(0, np.int64), whole)
    for u in set(units):
        assert whole[a == u].tolist() == list(range(units.count(u)))


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    from cglab.data.corpus import build_corpus, corpus_sources

    out = build_corpus(tmp_path_factory.mktemp("six_shards"), nl_chars=90_000, code_bytes=150_000, shards=UNITS)
    return corpus_sources(out["out"])


@pytest.fixture(scope="module")
def cfg(corpus, micro_tokenizer):
    return from_dict(
        {
            "data": {
                "sources": corpus,
                "seq_length": S,
                "mixture": "mix",
                "tokenizer": {"path": str(micro_tokenizer.path)},
            },
            "objective": {"kind": "codegen2"},
        }
    )


@pytest.fixture(scope="module")
def plan(ray_local, cfg):
    p = pipeline.prepare_data(cfg)
    assert len(pipeline.epoch_units(p, 0)[0]) == UNITS  # each file is one piece (data.chunk_tokens)
    return p


def _all(cfg, plan, epoch, dp_rank, dp_size, **kw):
    out = list(
        pipeline.iter_train_batches(cfg, epoch, dp_rank, dp_size, batch_size=16, plan=plan, drop_last=False, **kw)
    )
    return {k: np.concatenate([b[k] for b in out]) for k in out[0]}


@pytest.mark.slow
def test_ranks_partition_the_stream_for_dp_1_to_4(cfg, plan):
    ref = _all(cfg, plan, 0, 0, 1)
    ident = list(zip(ref["unit"].tolist(), ref["unit_index"].tolist()))
    assert len(set(ident)) == len(ident) and ref["unit"].tolist() == sorted(ref["unit"].tolist())
    by_id = {i: n for n, i in enumerate(ident)}
    for dp in (2, 3, 4):
        seen = []
        for r in range(dp):
            got = _all(cfg, plan, 0, r, dp)
            assert set(got["unit"].tolist()) == set(pipeline.assign_units(plan, 0, r, dp))  # only its own units
            ids = list(zip(got["unit"].tolist(), got["unit_index"].tolist()))
            rows = [by_id[i] for i in ids]
            for k in ("tokens", "labels", "loss_mask", "objective"):  # the very samples of the dp=1 stream
                assert np.array_equal(got[k], ref[k][rows]), (dp, r, k)
            seen += ids
        assert sorted(seen) == sorted(ident), dp  # nothing lost, nothing twice
    # another epoch: units of other pieces, each sample once, corruption drawn afresh
    e1 = _all(cfg, plan, 1, 0, 1)
    ids1 = list(zip(e1["unit"].tolist(), e1["unit_index"].tolist()))
    assert len(set(ids1)) == len(ids1) and not np.array_equal(e1["tokens"][:50], ref["tokens"][:50])


@pytest.mark.slow
def test_resume_skips_whole_units_without_opening_them(cfg, plan, tmp_path):
    dp, r = 2, 1
    units = pipeline.assign_units(plan, 0, r, dp)
    assert len(units) == 3
    full = _all(cfg, plan, 0, r, dp)
    # the position after the 5th sample of the rank's last unit
    at = int(np.flatnonzero((full["unit_ordinal"] == 2) & (full["unit_index"] == 5))[0])
    trace = tmp_path / "opened"
    trace.mkdir()
    resumed = _all(cfg, plan, 0, r, dp, start=(2, 5), trace_dir=str(trace))
    opened = sorted(p.name.split("-")[0] for p in trace.iterdir())
    assert opened == [f"unit{units[2]}"]  # the first two units were skipped unread; only the partial one re-read
    for k in ("tokens", "labels", "unit", "unit_index"):
        assert np.array_equal(resumed[k], full[k][at:]), k
