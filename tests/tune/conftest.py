import pytest


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory):
    from cglab.track.server import local_server

    with local_server(tmp_path_factory.mktemp("mlflow")) as server:
        yield server


@pytest.fixture(scope="module")
def ray_local():
    import ray

    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()
