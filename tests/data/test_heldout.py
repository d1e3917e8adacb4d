"""The held-out split (issue 24, item 6): sampled with the seed across every file and source of the prepared corpus,
sized in tokens, never read by the training stream (nor any byte-identical copy of it), and leaving the prepared
corpus's key as it was."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from cglab.config import from_dict
from cglab.data import heldout, pipeline, prepared, readers

pytestmark = pytest.mark.slow
FILES, DOCS, SEQ = 6, 400, 64


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """Six Stack files and six Pile files in content order (each document names its file), and, in the last Stack
    file, byte-identical copies of a few documents of every other file: the copies a held-out document may have."""
    d = tmp_path_factory.mktemp("heldout_corpus")
    (d / "stack").mkdir()
    (d / "pile").mkdir()
    for f in range(FILES):
        rows = [f"def g_{i}(y):\n    return y * {i} + {f}  # stack file_{f} " + "pad " * (i % 40) for i in range(DOCS)]
        if f == FILES - 1:
            rows += [
                f"def g_{i}(y):\n    return y * {i} + {g}  # stack file_{g} " + "pad " * (i % 40)
                for g in range(FILES - 1)
                for i in range(0, DOCS, 2)
            ]
        pq.write_table(pa.table({"content": rows, "lang": ["Python"] * len(rows)}), d / "stack" / f"{f:02d}.parquet")
        lines = [json.dumps({"text": f"Sentence {i} of pile file_{f}. " * (1 + i % 7)}) for i in range(DOCS)]
        (d / "pile" / f"{f:02d}.jsonl").write_text("\n".join(lines) + "\n")
    return [
        {"name": "stack", "kind": "stack", "paths": [str(d / "stack")]},
        {"name": "pile", "kind": "pile", "paths": [str(d / "pile")]},
    ]


def _cfg(corpus, tokenizer, cache, *overrides):
    base = {
        "data": {
            "sources": corpus,
            "seq_length": SEQ,
            "tokenizer": {"path": str(tokenizer.path)},
            "chunk_tokens": 512,
            "cache_path": str(cache),
            "filters": {"dedup": False},  # the split finds the copies itself
        },
        "objective": {"kind": "clm"},
        "eval": {"holdout": True, "heldout_tokens": 3000, "max_docs": 200},
    }
    return from_dict(base, list(overrides))


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("cache")


@pytest.fixture(scope="module")
def plan(ray_local, corpus, micro_tokenizer, cache):
    return pipeline.prepare_data(_cfg(corpus, micro_tokenizer, cache))


def _texts(path):
    return [json.loads(line)["text"] for line in open(path)]


def _streamed(plan):
    """Every document the training stream reads in epoch 0: (key, ids)."""
    return [(r["key"], np.asarray(r["ids"])) for r in pipeline.mix_dataset(plan, 0).iter_rows()]


def test_the_split_spreads_over_every_file_and_source_and_is_sized_in_tokens(plan):
    held = plan.artifacts["heldout"]
    for name, word in (("nl", "pile"), ("code", "stack")):
        texts = _texts(held["texts"][name])
        assert len(texts) == held[name]["documents"] > 0
        files = {int(t.split(f"{word} file_")[1].split()[0].rstrip(".")) for t in texts}
        assert files == set(range(FILES)), (name, files)  # sampled across the files, not the last one
        # sized in tokens: every document counted up to seq_length, the budget met by the last one
        assert 3000 <= held[name]["tokens"] < 3000 + SEQ
        assert held[name]["documents"] <= 200
    tok = plan.tokenizer()
    assert all(len(tok.encode(t)) <= SEQ for t in _texts(held["texts"]["code"]))  # one scoring context each


def test_the_stream_never_reads_a_held_out_document_or_a_copy_of_one(corpus, micro_tokenizer, cache):
    """Code only (data.mixture=pl_only), so one epoch reads its source to the end: every code document of the
    prepared corpus (which holds every source, weighted or not) is either read once or held out (or a copy of a
    held-out one), never both."""
    plan = pipeline.prepare_data(_cfg(corpus, micro_tokenizer, cache, "data.mixture=pl_only"))
    held = plan.artifacts["heldout"]
    ex = heldout.excluded(plan.heldout)
    assert held["duplicates"] > 0  # copies planted in the last Stack file were found
    assert len(ex) == held["nl"]["documents"] + held["code"]["documents"] + held["duplicates"]
    streamed = _streamed(plan)
    keys = np.array([k for k, _ in streamed])
    assert not np.isin(keys, ex).any()
    idx = prepared.load_index(plan.prepared)
    code = idx.source == 0
    code_ex = int((np.array([readers.split_key(k)[0] for k in ex.tolist()]) == 0).sum())
    assert len(keys) == len(set(keys.tolist())) == int(idx.documents[code].sum()) - code_ex
    # no training document is byte-identical to a held-out one (compared by content, not by key)
    tok = plan.tokenizer()
    held_texts = set(_texts(held["texts"]["code"]))
    trained = {tok.decode(ids[:SEQ], skip_special_tokens=True) for _, ids in streamed}
    assert len(trained) > 1000 and not held_texts & trained


def test_holding_out_keeps_the_prepared_corpus_and_a_second_prepare_reuses_everything(
    plan, corpus, micro_tokenizer, cache
):
    no_split = pipeline.prepare_data(_cfg(corpus, micro_tokenizer, cache, "eval.holdout=false"))
    assert no_split.prepared == plan.prepared and not no_split.heldout
    assert not no_split.artifacts["tokens"]["built"]
    again = pipeline.prepare_data(_cfg(corpus, micro_tokenizer, cache))
    assert again.heldout == plan.heldout and not again.artifacts["heldout"]["built"]
    assert _texts(again.artifacts["heldout"]["texts"]["code"]) == _texts(plan.artifacts["heldout"]["texts"]["code"])
    # another seed: another sample of the same prepared corpus
    other = pipeline.prepare_data(_cfg(corpus, micro_tokenizer, cache, "eval.heldout_seed=7"))
    assert other.prepared == plan.prepared and other.heldout != plan.heldout
    assert set(_texts(other.artifacts["heldout"]["texts"]["code"])) != set(
        _texts(plan.artifacts["heldout"]["texts"]["code"])
    )


def test_max_docs_bounds_the_split(corpus, micro_tokenizer, cache):
    small = pipeline.prepare_data(_cfg(corpus, micro_tokenizer, cache, "eval.max_docs=7"))
    for name in ("nl", "code"):
        assert small.artifacts["heldout"][name]["documents"] == 7
        assert len(_texts(small.artifacts["heldout"]["texts"][name])) == 7


def test_sample_takes_every_document_when_the_budget_exceeds_the_kind():
    """A budget larger than the kind: every document is held out, each once, and the draw stops."""
    idx = prepared.Index(
        "mem",
        source=np.array([0, 0, 1], np.int32),
        file=np.array([0, 1, 0], np.int32),
        row_group=np.zeros(3, np.int32),
        documents=np.array([3, 2, 4], np.int64),
        tokens=np.array([30, 20, 40], np.int64),
    )
    pieces = {r: (np.arange(n) + 100 * r, [np.arange(10)] * n) for r, n in enumerate(idx.documents.tolist())}
    got = heldout.sample(idx, ["stack", "pile"], "stack", 0, 10**6, 10**6, 64, lambda r: pieces[r])
    assert sorted(k for k, *_ in got) == [0, 1, 2, 100, 101]
    assert {(s, f) for _, s, f, _ in got} == {(0, 0), (0, 1)}


def test_the_plan_lists_the_split_and_the_prepared_corpus_exact_counts(plan, corpus, micro_tokenizer, cache):
    from cglab.train.plan import plan_run

    out = plan_run(_cfg(corpus, micro_tokenizer, cache))
    held = plan.artifacts["heldout"]
    assert out["data"]["heldout"]["path"] == plan.heldout
    assert out["data"]["heldout"]["code"] == held["code"] and out["data"]["heldout"]["nl"] == held["nl"]
    idx = prepared.load_index(plan.prepared)
    for s, e in enumerate(out["data"]["sources"]):
        assert e["method"].startswith("exact") and e["documents"] == int(idx.documents[idx.source == s].sum())
    # the epoch's units are composed of the real pieces
    assert out["tokens_needed"]["epoch_reads"]["units"] == len(pipeline.epoch_units(plan, 0)[0])


def test_a_small_kind_holds_out_at_most_its_share():
    """A budget the kind cannot spare: eval.heldout_max_fraction of its documents, rounded down (none from a kind
    of 9 at 10%), so a small corpus keeps most of itself for training."""
    idx = prepared.Index(
        "mem",
        source=np.array([0, 0, 1], np.int32),
        file=np.array([0, 1, 0], np.int32),
        row_group=np.zeros(3, np.int32),
        documents=np.array([30, 20, 9], np.int64),
        tokens=np.array([300, 200, 90], np.int64),
    )
    pieces = {r: (np.arange(n) + 100 * r, [np.arange(10)] * n) for r, n in enumerate(idx.documents.tolist())}
    kinds = ["stack", "pile"]
    got = heldout.sample(idx, kinds, "stack", 0, 10**6, 10**6, 64, lambda r: pieces[r], max_fraction=0.1)
    assert len(got) == 5 and {(s, f) for _, s, f, _ in got} == {(0, 0), (0, 1)}
    assert heldout.sample(idx, kinds, "pile", 0, 10**6, 10**6, 64, lambda r: pieces[r], max_fraction=0.1) == []
