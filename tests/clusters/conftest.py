"""The multi-node test bed (tests/clusters/multinode.py): one S3 store and one cluster per test run, started by the
first test that asks for it and stopped at the end of the run."""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Iterator

import pytest

from tests.clusters.multinode import MultiNode, multinode


@pytest.fixture(scope="session")
def cluster(tmp_path_factory, s3_store):
    """The head (0 CPUs) and two worker nodes `node_a`, `node_b` (3 CPUs each) that cannot see pytest's temp root,
    and the S3 store (tests/conftest.py) with its bucket, which the nodes reach through their AWS_* env."""
    with multinode(tmp_path_factory.getbasetemp(), {"node_a": 3, "node_b": 3}, s3_store) as c:
        yield c


@contextlib.contextmanager
def driver_on(cluster: MultiNode, where: Path) -> Iterator[MultiNode]:
    """A driver of the cluster in this process: working directory and HOME under `where` (inside pytest's temp
    root, so hidden from the worker nodes), connected to the cluster; disconnected after (the cluster stays up)."""
    import ray

    driver = where / "driver"
    (driver / "home").mkdir(parents=True)
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(driver)
        mp.setenv("HOME", str(driver / "home"))
        mp.delenv("XDG_CACHE_HOME", raising=False)
        mp.delenv("MLFLOW_TRACKING_URI", raising=False)
        mp.setenv("RAY_ADDRESS", cluster.gcs)
        ray.init(address=cluster.gcs, log_to_driver=True)
        try:
            yield cluster
        finally:
            ray.shutdown()


@pytest.fixture
def on_cluster(cluster, tmp_path):
    """This test's driver (`driver_on` its tmp_path)."""
    with driver_on(cluster, tmp_path) as c:
        yield c
