from __future__ import annotations

import pytest


def start_local_ray(tmp_path_factory, num_cpus: int):
    """A private local Ray cluster with `num_cpus` logical CPUs and quiet Ray Data; the caller shuts it down."""
    import ray
    from ray.data import DataContext

    ray.init(address="local", num_cpus=num_cpus, include_dashboard=False, log_to_driver=False,
             _temp_dir=str(tmp_path_factory.mktemp("ray")), configure_logging=False)
    DataContext.get_current().enable_progress_bars = False
    return ray


@pytest.fixture(scope="module")
def ray_local(tmp_path_factory):
    """A private local Ray cluster for one test module (2 logical CPUs), shut down afterwards."""
    ray = start_local_ray(tmp_path_factory, 2)
    yield ray
    ray.shutdown()
