import pytest


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory):
    from cglab.track.server import local_server

    with local_server(tmp_path_factory.mktemp("mlflow")) as server:
        yield server


@pytest.fixture(scope="module")
def ray_local():
    from cglab.raylocal import local_ray

    with local_ray(2):
        yield
