import json

import pytest

from cglab.config import ConfigError
from cglab.data.dedup import content_hashes
from cglab.data.pipeline import sample_texts
from cglab.tune.heldout import split_sources


def test_last_file_of_each_source_is_held_out_and_never_trained_on(micro_sources, tmp_path):
    from cglab.config import DataConfig, SourceConfig

    train, held = split_sources(micro_sources, tmp_path)
    for src, orig in zip(train, micro_sources):
        assert src["name"] == orig["name"] and len(src["paths"]) == 1 and src["paths"][0].endswith("00" + (
            ".jsonl.zst" if src["kind"] == "pile" else ".parquet"))
    nl = [json.loads(line)["text"] for line in open(held.nl_path)]
    code = [json.loads(line)["text"] for line in open(held.code_path)]
    assert len(nl) == held.counts["nl"] > 0 and len(code) == held.counts["code"] > 0
    # Nothing held out is byte-identical to a document the training stream can read.
    trained = set(content_hashes(sample_texts(DataConfig(sources=[SourceConfig(**s) for s in train]), 10**6)))
    assert not trained & set(content_hashes(nl + code))
    # Deterministic: a restored sweep gets the same split.
    again, held2 = split_sources(micro_sources, tmp_path / "again")
    assert again == train and open(held2.code_path).read() == open(held.code_path).read()


def test_single_file_sources_cannot_be_split(micro_sources, tmp_path):
    one = [dict(s, paths=[s["paths"][0] + ("/00.jsonl.zst" if s["kind"] == "pile" else "/00.parquet")])
           for s in micro_sources]
    with pytest.raises(ConfigError, match="no source has two or more files"):
        split_sources(one, tmp_path)
