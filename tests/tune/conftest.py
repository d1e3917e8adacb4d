import pytest


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory):
    from cglab.track.server import local_server

    with local_server(tmp_path_factory.mktemp("mlflow")) as server:
        yield server


@pytest.fixture(scope="module")
def ray_local(tmp_path_factory):
    """A private local Ray. 3 logical CPUs on any machine: one laptop trial holds 0.5 (Tune driver function)
    + 1 (Train worker) and leaves 1 for the Ray Data tasks of its input pipeline."""
    import ray

    ray.init(address="local", num_cpus=3, include_dashboard=False, log_to_driver=False,
             _temp_dir=str(tmp_path_factory.mktemp("ray")), configure_logging=False)
    yield
    ray.shutdown()
