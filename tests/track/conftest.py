import pytest


@pytest.fixture(scope="module")
def ray_local():
    from cglab.raylocal import local_ray

    with local_ray(2):
        yield
