import pytest


@pytest.fixture(scope="module")
def ray_local(tmp_path_factory):
    """A private local Ray. 3 logical CPUs on any machine: one laptop trial holds 0.5 (Tune driver function)
    + 1 (Train worker) and leaves 1 for the Ray Data tasks of its input pipeline."""
    from cglab.raylocal import local_ray

    with local_ray(3, tmp_path_factory.mktemp("ray")):
        yield
