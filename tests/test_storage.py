"""A run's storage location, local or an object-store URI: a URI reaches Ray Train's and Tune's RunConfig as it was
given (Path.resolve would make `s3://b/x` the local `<cwd>/s3:/b/x`), a relative local path becomes absolute, and
the directory the driver writes its own files to is local either way, distinct per storage."""

from pathlib import Path

import pytest

from cglab import storage
from cglab.config import from_dict
from cglab.train import trainer
from cglab.tune.sweep import SweepPlaces

URIS = ["s3://bucket/runs", "s3://bucket", "gs://bucket/a/b/", "hdfs://namenode:8020/x"]


@pytest.mark.parametrize("uri", URIS)
def test_a_uri_storage_reaches_ray_train_s_run_config_unchanged(uri, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    where, run_dir = trainer.run_paths(uri, "r1")
    rc = trainer.run_config(from_dict({}, []), where, "r1")
    assert (where, rc.storage_path, rc.name) == (uri, uri, "r1")
    scheme, rest = uri.split("://")
    assert run_dir == tmp_path / ".cglab/uri" / scheme / rest.strip("/") / "r1"  # local, named after the URI


def test_a_local_storage_becomes_absolute(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = from_dict({}, ["train.keep_last=3", "train.max_failures=2"])
    where, run_dir = trainer.run_paths("runs", "r1")
    rc = trainer.run_config(cfg, where, "r1")
    assert rc.storage_path == where == str(tmp_path / "runs") and run_dir == tmp_path / "runs" / "r1"
    assert rc.checkpoint_config.num_to_keep == 3 and rc.failure_config.max_failures == 2
    assert trainer.run_paths(None, "r1") == (str(tmp_path / ".cglab/runs"), tmp_path / ".cglab/runs/r1")
    assert trainer.run_paths("~/x", "r1")[0] == str(Path.home() / "x")


def test_a_sweep_keeps_a_uri_for_its_experiment_and_its_trials(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    p = SweepPlaces.of("s3://bucket/tune/", "lesson-2")
    assert (p.storage, p.experiment, p.trials) == (
        "s3://bucket/tune/",
        "s3://bucket/tune/lesson-2",
        "s3://bucket/tune/lesson-2-train",
    )
    assert p.inputs == "s3://bucket/tune/lesson-2-inputs"  # in the storage, where trials on any node read them
    local = SweepPlaces.of(".cglab/tune", "lesson-2")
    assert local.trials == str(tmp_path / ".cglab/tune/lesson-2-train")
    assert local.inputs == str(tmp_path / ".cglab/tune/lesson-2-inputs")


@pytest.mark.parametrize(
    "path, uri",
    [("s3://b/x", True), ("file:///tmp/x", True), ("/tmp/x", False), ("runs/s3://x", False), ("c:/x", False)],
)
def test_what_counts_as_a_uri(path, uri):
    assert storage.is_uri(path) is uri
    if uri:
        assert storage.location(path) == path
    else:
        assert Path(storage.location(path)).is_absolute()


def test_join_and_local_dir():
    assert storage.join("s3://b/x/", "n", "m") == "s3://b/x/n/m"
    assert storage.join("/a/b", "n") == "/a/b/n"
    assert storage.local_dir("s3://b/x") != storage.local_dir("gs://b/x")  # two storages never share a directory


def test_files_at_a_uri_round_trip_through_an_s3_store(s3_store, tmp_path):
    """What the driver settles for workers on other nodes, written to and read back from a real S3 API: bytes (kept
    as stored: a `.zst` name is not recompressed), a tokenizer, held-out texts; a checkpoint-like directory fetched
    to local scratch; Ray's scheme-less checkpoint path made a URI again."""
    from cglab.data.tokenizer import CGTokenizer, train_tokenizer
    from cglab.eval.nl import read_texts

    uri = "s3://cglab/unit/x.zst"
    storage.write_bytes(uri, b"not zstd")
    assert storage.exists(uri) and not storage.exists("s3://cglab/unit/nothing")
    assert storage.read_bytes(uri) == b"not zstd"

    tok = train_tokenizer(["def f(x):\n    return x\n"] * 20, 300, 4, 8)
    assert tok.save("s3://cglab/unit/tok") == "s3://cglab/unit/tok"
    back = CGTokenizer.load("s3://cglab/unit/tok")
    assert (back.to_str(), back.num_sentinels, back.max_whitespace_run) == (tok.to_str(), 4, 8)

    storage.write_bytes("s3://cglab/unit/held/nl.jsonl", b'{"text": "a"}\n{"text": "b"}\n')
    assert read_texts("s3://cglab/unit/held/nl.jsonl") == ["a", "b"]

    storage.write_bytes("s3://cglab/unit/ckpt/sub/f.bin", b"123")
    with storage.local_copy("s3://cglab/unit/ckpt") as d:
        assert (d / "sub/f.bin").read_bytes() == b"123"
    assert not d.exists()  # node-local scratch, removed after use
    with storage.local_copy(tmp_path) as d:
        assert d == tmp_path  # a local directory is used where it is

    assert storage.uri_of("cglab/runs/x/checkpoint_1", "s3://cglab/runs") == "s3://cglab/runs/x/checkpoint_1"
    assert storage.uri_of("/abs/runs/x/checkpoint_1", "/abs/runs") == "/abs/runs/x/checkpoint_1"


def test_a_uri_storage_keeps_the_corpus_beside_its_runs():
    """data.cache_path unset: <storage>/corpus for a URI storage (every node reads it), the default for a local one;
    a cache_path given is kept."""
    from cglab.data.artifacts import shared_cache

    cfg = from_dict({}, [])
    assert shared_cache(cfg, "s3://b/runs").data.cache_path == "s3://b/runs/corpus"
    assert shared_cache(cfg, "/abs/runs").data.cache_path == ""
    given = from_dict({}, ["data.cache_path=/shared/cache"])
    assert shared_cache(given, "s3://b/runs").data.cache_path == "/shared/cache"
