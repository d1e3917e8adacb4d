"""`cglab data stream`: each sample's documents are the ones its tokens came from, its counts add up, and the
summary's token share is the mixture's (data.mix_by=tokens)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from cglab.cli import main
from cglab.data import pipeline, prepared, readers

pytestmark = pytest.mark.slow


@pytest.fixture()
def config(micro_sources, micro_tokenizer, micro_cache, tmp_path):
    path = tmp_path / "run.yaml"
    data = {
        "sources": micro_sources,
        "seq_length": 128,
        "mixture": "mix",
        "tokenizer": {"path": str(micro_tokenizer.path)},
        "cache_path": micro_cache,
    }
    path.write_text(json.dumps({"data": data, "objective": {"kind": "clm"}}))
    return path


def _doc_ids(plan, key: int) -> np.ndarray:
    """A document's token ids, from the prepared corpus (independently of the stream)."""
    s, f, _ = readers.split_key(key)
    idx = prepared.load_index(plan.prepared)
    for g in idx.row_group[(idx.source == s) & (idx.file == f)].tolist():
        keys, ids = prepared.read_piece({}, plan.prepared, s, f, g)
        hit = np.flatnonzero(keys == key)
        if hit.size:
            return ids[int(hit[0])]
    raise KeyError(key)


def test_stream_lists_each_samples_documents_and_the_token_share(config, capsys, ray_local):
    from cglab.config import load_config

    assert main(["data", "stream", str(config), "--samples", "300", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    samples, summary = report["samples"], report["summary"]
    assert len(samples) == 300 and summary["samples"] == 300
    cfg = load_config(str(config))
    plan = pipeline.prepare_data(cfg)
    batch = next(pipeline.iter_train_batches(cfg, 0, 0, 1, batch_size=40, plan=plan))  # the training stream
    for x, tokens, seg in zip(samples[:40], batch["tokens"], batch["segment_ids"]):
        assert (x["unit"], x["unit_index"]) == (batch["unit"][x["sample"]], batch["unit_index"][x["sample"]])
        assert x["tokens"] == sum(x["source_tokens"].values()) == int((seg >= 0).sum()) > 0
        # CLM: the sample's tokens are a stretch of its documents' tokens, in order, first and last possibly cut
        ids = np.concatenate([_doc_ids(plan, readers.make_key(*_where(plan, d))) for d in x["documents"]])
        assert _contains(ids, tokens[seg >= 0]), x["sample"]
        assert {d["source"] for d in x["documents"]} == {n for n, t in x["source_tokens"].items() if t}
    # 300 samples of 128 tokens: the mix by tokens is half and half to within a code file or two
    assert summary["planned_token_share"] == {"pile": 0.5, "stack": 0.5}
    assert summary["token_share"]["pile"] == pytest.approx(0.5, abs=0.1), summary
    assert summary["documents"] > 0 and all(v.split(" of ")[0] != "0" for v in summary["files_touched"].values())
    # the text form prints one line a sample and the summary
    assert main(["data", "stream", str(config), "--samples", "5"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert len(out) == 6 and out[-1].startswith("summary: 5 samples") and " docs: " in out[0]


def _where(plan, d):
    s = next(x.index for x in plan.sources if x.name == d["source"])
    return s, plan.sources[s].files.index(d["file"]), d["record"]


def _contains(hay: np.ndarray, needle: np.ndarray) -> bool:
    n = len(needle)
    return any(np.array_equal(hay[i : i + n], needle) for i in range(len(hay) - n + 1))
