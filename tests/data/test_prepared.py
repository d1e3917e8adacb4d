"""The prepared corpus and the shuffled stream over it (issue 24): built once and reused, any 1% of an epoch draws
from every file in proportion although the files are written in content order, and every DP layout reads every
surviving document exactly once per epoch."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from cglab.config import from_dict
from cglab.data import pipeline, prepared, readers

pytestmark = pytest.mark.slow
FILES, DOCS = 8, 20_000  # a Stack of 8 files of 20,000 short documents (~28 tokens): ~17,500 pieces of ~9


@pytest.fixture(scope="module")
def sorted_stack(tmp_path_factory):
    """Files in content order, as the Stack's data/<lang>/ layout and the package corpus are: every document of
    file f says which file it is in (`file_f`), so where a document came from can be read off its text."""
    d = tmp_path_factory.mktemp("sorted_stack")
    for f in range(FILES):
        rows = [f"def f_{i}(x):\n    return x + {i}  # file_{f}\n" for i in range(DOCS)]
        pq.write_table(pa.table({"content": rows, "lang": ["Python"] * DOCS}), d / f"{f:02d}.parquet")
    return [{"name": "stack", "kind": "stack", "paths": [str(d)]}]


@pytest.fixture(scope="module")
def cfg(sorted_stack, micro_tokenizer, tmp_path_factory):
    return from_dict(
        {
            "data": {
                "sources": sorted_stack,
                "seq_length": 128,
                "tokenizer": {"path": str(micro_tokenizer.path)},
                "chunk_tokens": 256,  # ~8 documents a piece
                "cache_path": str(tmp_path_factory.mktemp("cache")),
                "filters": {"dedup": False},  # every document is distinct already
            },
            "objective": {"kind": "clm"},
        }
    )


@pytest.fixture(scope="module")
def plan(ray_local, cfg):
    return pipeline.prepare_data(cfg)


def _file_of(plan, key: int) -> int:
    return readers.split_key(key)[1]


def test_a_second_prepare_reuses_the_prepared_corpus(cfg, plan):
    assert plan.artifacts["tokens"]["built"] and plan.artifacts["tokens"]["pieces"] > 1000
    again = pipeline.prepare_data(cfg)
    assert not again.artifacts["tokens"]["built"] and again.prepared == plan.prepared
    idx = prepared.load_index(plan.prepared)
    assert int(idx.documents.sum()) == FILES * DOCS and int(idx.tokens.max()) <= cfg.data.chunk_tokens
    # another chunk size is another prepared corpus
    other = from_dict(cfg.model_dump() | {"data": cfg.data.model_dump() | {"chunk_tokens": 4096}})
    assert pipeline.prepare_data(other).prepared != plan.prepared


def test_the_first_percent_of_an_epoch_draws_from_every_file_in_proportion(plan):
    """Read in file order, the first 1% would be file 0 alone. Shuffled, the first 1% (1,600 documents, ~175
    pieces) holds documents of every file, each file's share within 60% of proportional (3 standard deviations of
    ~22 pieces a file), and a chi-square test against proportional shares does not reject (p > 0.001). Documents
    arrive in pieces of ~9, so the test counts in pieces (documents / mean documents a piece)."""
    from scipy.stats import chisquare

    idx = prepared.load_index(plan.prepared)
    per_piece = idx.documents.mean()
    for epoch in (0, 1):
        keys = [r["key"] for r in pipeline.mix_dataset(plan, epoch).take(FILES * DOCS // 100)]
        counts = np.bincount([_file_of(plan, k) for k in keys], minlength=FILES)
        expected = len(keys) / FILES
        assert (np.abs(counts - expected) <= 0.6 * expected).all(), (epoch, counts)
        assert chisquare(counts / per_piece).pvalue > 1e-3, (epoch, counts)


def test_one_epoch_at_any_dp_reads_every_document_exactly_once(plan):
    """The epoch's units hold every piece once and stream every document of their pieces once; at DP = 1, 2, 3, 4
    the ranks' units partition the epoch's units (each unit's output depends on the unit alone, test_sharding), and
    the ranks hold equal shares to within one unit (what the feed's lockstep can leave unread)."""
    members, yields = pipeline.epoch_units(plan, 0)
    idx = prepared.load_index(plan.prepared)
    assert len(members) == pipeline.MIN_UNITS  # 1.1M tokens: the floor, not tokens / data.unit_tokens
    assert sorted(np.concatenate(members).tolist()) == list(range(len(idx)))
    keys = [row["key"] for row in pipeline.mix_dataset(plan, 0).take_all()]
    assert len(keys) == len(set(keys)) == FILES * DOCS
    for dp in (1, 2, 3, 4):
        shares = [pipeline.assign_units(plan, 0, r, dp) for r in range(dp)]
        assert sorted(u for s in shares for u in s) == list(range(len(members))), dp
        per_rank = [sum(yields[u] for u in s) for s in shares]
        assert max(per_rank) - min(per_rank) <= yields.max(), dp
