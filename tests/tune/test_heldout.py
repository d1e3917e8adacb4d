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
        assert (
            src["name"] == orig["name"]
            and len(src["paths"]) == 1
            and src["paths"][0].endswith("00" + (".jsonl.zst" if src["kind"] == "pile" else ".parquet"))
        )
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
    one = [
        dict(s, paths=[s["paths"][0] + ("/00.jsonl.zst" if s["kind"] == "pile" else "/00.parquet")])
        for s in micro_sources
    ]
    with pytest.raises(ConfigError, match="no source has two or more files"):
        split_sources(one, tmp_path)


def _one_file(sources, kinds=("pile", "stack")):
    """The sources with only their first shard for the given kinds: nothing of those kinds can be held out."""
    first = {"pile": "/00.jsonl.zst", "stack": "/00.parquet"}
    return [dict(s, paths=[s["paths"][0] + first[s["kind"]]]) if s["kind"] in kinds else s for s in sources]


def _base(sources, *overrides):
    from cglab.tune.presets import base_config

    return base_config("laptop", overrides=[f"data.sources={json.dumps(sources)}", *overrides])


def test_sweep_without_heldout_split_refuses_before_any_work(micro_sources, tmp_path):
    from cglab.tune.sweep import prepare_base

    with pytest.raises(
        ConfigError,
        match=r"eval\.allow_builtin_texts: no held-out nl or code documents.*"
        r"no source has two or more files",
    ):
        prepare_base(_base(_one_file(micro_sources)), tmp_path)
    assert not (tmp_path / "tokenizer").exists()  # refused before the tokenizer was trained
    with pytest.raises(ConfigError, match=r"eval\.allow_builtin_texts: no held-out nl or code .*holdout=False"):
        prepare_base(_base(micro_sources), tmp_path, holdout=False)


def test_builtin_texts_only_when_allowed_and_named(micro_sources, micro_tokenizer, tmp_path, caplog):
    from cglab.tune.evaluate import text_sources, text_tags
    from cglab.tune.sweep import prepare_base

    # held-out code but no held-out NL: the NL part needs the flag, and the warning and tags say what fell back
    partial = _one_file(micro_sources, kinds=("pile",))
    with pytest.raises(ConfigError, match=r"eval\.allow_builtin_texts: no held-out nl documents"):
        prepare_base(_base(partial), tmp_path / "refused")
    tok = f"data.tokenizer.path={json.dumps(str(micro_tokenizer.path))}"
    with caplog.at_level("WARNING", logger="cglab.tune.sweep"):
        _, nl, code = prepare_base(_base(partial, "eval.allow_builtin_texts=true", tok), tmp_path / "allowed")
    assert nl is None and code is not None
    assert "scoring nl on cglab.eval.nl.builtin_texts" in caplog.text
    assert text_tags(text_sources(nl, code, True)) == {
        "eval.texts": "partial",
        "eval.heldout": "nl:builtin,code:heldout",
    }
    assert text_tags(text_sources(None, None, True)) == {
        "eval.texts": "builtin",
        "eval.heldout": "nl:builtin,code:builtin",
    }
    assert text_tags(text_sources("nl.jsonl", "code.jsonl", False)) == {
        "eval.texts": "heldout",
        "eval.heldout": "nl:heldout,code:heldout",
    }


def test_evaluate_checkpoint_refuses_builtin_texts_unless_allowed(micro_sources):
    from cglab.tune.evaluate import evaluate_checkpoint

    # refused before the checkpoint is even opened: a missing one would be a different error
    with pytest.raises(ConfigError, match=r"eval\.allow_builtin_texts: no held-out code documents"):
        evaluate_checkpoint("/nonexistent/checkpoint", _base(micro_sources), "nl.jsonl", None)
