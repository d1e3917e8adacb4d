"""Corpus artifacts (issue 14): the dedup drop list and the trained tokenizer are built once per corpus under
data.cache_path, found again by every later prepare (no scan, no training), rebuilt when a file changes; the
training stream drops by each file's part of the drop list."""

from __future__ import annotations

import json
import os

import pytest
import yaml

from cglab.config import FilterConfig, SourceConfig, from_dict
from cglab.data import artifacts, pipeline, readers
from cglab.data.readers import make_key
from tests.data.conftest import cached_corpus_config

pytestmark = pytest.mark.slow
DUP = "def shared():\n    return 'the same file everywhere'\n"


def _write(path, texts):
    path.write_text("".join(json.dumps({"text": t, "meta": {"pile_set_name": "Github"}}) + "\n" for t in texts))


@pytest.fixture
def corpus(tmp_path):
    d = tmp_path / "data"
    d.mkdir()
    _write(d / "a.jsonl", ["unique a0\n", "unique a1\n", "unique a2\n", DUP, "another a4\n"])
    _write(d / "b.jsonl", [DUP, "unique b1\n", DUP, "another a4\n"])
    (d / "other").mkdir()
    _write(d / "other" / "c.jsonl", [DUP, "unique c1\n"])
    return [
        SourceConfig(name="first", kind="pile", paths=[str(d / "*.jsonl")]),
        SourceConfig(name="second", kind="pile", paths=[str(d / "other")]),
    ]


LATER_COPIES = [make_key(0, 1, 0), make_key(0, 1, 2), make_key(0, 1, 3), make_key(1, 0, 0)]


def _no(name):
    def refuse(*a, **k):
        raise AssertionError(f"{name} ran: the artifact was not reused")

    return refuse


def test_drop_list_is_built_once_reused_and_rebuilt_when_a_file_changes(ray_local, corpus, tmp_path, monkeypatch):
    srcs, root = readers.resolve_files(corpus), str(tmp_path / "cache")
    first = artifacts.dedup_drops(srcs, FilterConfig(), root)
    assert first["built"] and first["documents_dropped"] == 4
    assert artifacts.file_drops(first["path"], 0, 0).tolist() == []  # a.jsonl holds the first copies
    assert artifacts.file_drops(first["path"], 0, 1).tolist() == LATER_COPIES[:3]
    assert artifacts.file_drops(first["path"], 1, 0).tolist() == LATER_COPIES[3:]
    stamp = os.stat(first["path"]).st_mtime_ns

    with monkeypatch.context() as m:  # a second prepare of the same corpus: no scan at all
        m.setattr(artifacts, "build_drops", _no("the dedup scan"))
        m.setattr(pipeline, "scan_dataset", _no("the dedup scan"))
        again = artifacts.dedup_drops(srcs, FilterConfig(), root)
    assert (again["built"], again["path"]) == (False, first["path"]) and os.stat(again["path"]).st_mtime_ns == stamp
    # other filter settings are another artifact
    assert artifacts.dedup_drops(srcs, FilterConfig(min_chars=2), root)["path"] != first["path"]

    b = tmp_path / "data" / "b.jsonl"
    b.write_text(b.read_text() + json.dumps({"text": DUP, "meta": {"pile_set_name": "Github"}}) + "\n")
    os.utime(b, ns=(stamp + 10**9, stamp + 10**9))  # even within the filesystem's mtime resolution
    changed = artifacts.dedup_drops(readers.resolve_files(corpus), FilterConfig(), root)
    assert changed["built"] and changed["path"] != first["path"] and changed["documents_dropped"] == 5


def test_prepare_reuses_tokenizer_and_dedup_and_the_stream_drops_later_copies(
    ray_local, corpus, tmp_path, monkeypatch, capsys
):
    from cglab.cli import main

    cache = tmp_path / "cache"
    raw = cached_corpus_config(corpus, cache, train_docs=20, seq_length=32)
    cfg = from_dict(raw)
    plan = pipeline.prepare_data(cfg)
    assert plan.artifacts["tokenizer"]["built"] and plan.artifacts["dedup"]["built"]
    # what a read task keeps of its files (the mix stops at the first source to run dry, so ask per source)
    max_bytes = readers.max_record_bytes(cfg.data.filters.max_chars)
    keys = sorted(
        k
        for src in plan.sources
        for k, _ in pipeline._kept_documents(src, range(len(src.files)), cfg.data.filters, plan.dedup_path, max_bytes)
    )
    assert not set(keys) & set(LATER_COPIES) and make_key(0, 0, 3) in keys and len(keys) == 11 - 4

    (tmp_path / "run.yaml").write_text(yaml.safe_dump(raw))
    with monkeypatch.context() as m:
        import cglab.data.tokenizer as tokmod

        m.setattr(artifacts, "build_drops", _no("the dedup scan"))
        m.setattr(tokmod, "train_tokenizer", _no("tokenizer training"))
        assert main(["corpus", "prepare", str(tmp_path / "run.yaml")]) == 0
        out = json.loads(capsys.readouterr().out)
        again = pipeline.prepare_data(cfg)
    assert out["dedup"]["built"] is False and out["tokenizer"]["built"] is False
    assert again.dedup_path == plan.dedup_path and again.tokenizer_json == plan.tokenizer_json
