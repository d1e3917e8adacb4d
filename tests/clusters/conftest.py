"""The multi-node test bed (tests/clusters/multinode.py): one S3 store and one cluster per test run, started by the
first test that asks for it and stopped at the end of the run."""

from __future__ import annotations

import pytest

from tests.clusters.multinode import multinode


@pytest.fixture(scope="session")
def cluster(tmp_path_factory, s3_store):
    """The head (0 CPUs) and two worker nodes `node_a`, `node_b` (3 CPUs each) that cannot see pytest's temp root,
    and the S3 store (tests/conftest.py) with its bucket, which the nodes reach through their AWS_* env."""
    with multinode(tmp_path_factory.getbasetemp(), {"node_a": 3, "node_b": 3}, s3_store) as c:
        yield c


@pytest.fixture
def on_cluster(cluster, tmp_path, monkeypatch):
    """This test's driver: working directory and HOME in its tmp_path (hidden from the worker nodes), connected to
    the cluster; disconnected after (the cluster stays up for the next test)."""
    import ray

    driver = tmp_path / "driver"
    (driver / "home").mkdir(parents=True)
    monkeypatch.chdir(driver)
    monkeypatch.setenv("HOME", str(driver / "home"))
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setenv("RAY_ADDRESS", cluster.gcs)
    ray.init(address=cluster.gcs, log_to_driver=True)
    try:
        yield cluster
    finally:
        ray.shutdown()
