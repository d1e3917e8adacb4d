from __future__ import annotations

import pytest


@pytest.fixture(scope="module")
def ray_local(tmp_path_factory):
    """A private local Ray cluster for one test module (2 logical CPUs), shut down afterwards."""
    import ray
    from ray.data import DataContext

    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False,
             _temp_dir=str(tmp_path_factory.mktemp("ray")), configure_logging=False)
    DataContext.get_current().enable_progress_bars = False
    yield ray
    ray.shutdown()
