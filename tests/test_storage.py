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
