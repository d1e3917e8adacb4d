from __future__ import annotations

import pytest

from cglab.raylocal import local_ray


@pytest.fixture(scope="module")
def ray_local(tmp_path_factory):
    """A private local Ray cluster for one test module (2 logical CPUs), shut down afterwards."""
    import ray

    with local_ray(2, tmp_path_factory.mktemp("ray")):
        yield ray
