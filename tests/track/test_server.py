import sqlite3
import urllib.request

import psutil
import pytest

from cglab.track.server import enable_wal, local_server, sqlite_uri

pytestmark = [pytest.mark.slow, pytest.mark.no_ray]  # no_ray: runs beside the Ray tests (Makefile: RAY_TESTS)


def test_wal_mode_is_set_on_a_fresh_sqlite_store(tmp_path):
    uri = sqlite_uri(tmp_path / "sub" / "m.db")
    enable_wal(uri)
    assert sqlite3.connect(tmp_path / "sub" / "m.db").execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    enable_wal("postgresql://u@h/db")  # other stores are left to themselves


def test_local_server_serves_a_sql_store_and_stops(tmp_path):
    from mlflow import MlflowClient

    with local_server(tmp_path, start_timeout_s=None) as server:
        assert server.host == "127.0.0.1"
        client = MlflowClient(server.uri)
        run = client.create_run(client.create_experiment("e"))
        client.log_text(run.info.run_id, "x: 1", "config.yaml")  # proxied artifact upload
        assert (tmp_path / "mlflow.db").exists()
        assert list((tmp_path / "artifacts").rglob("config.yaml"))
        proc = server.proc
        # the server and its uvicorn worker only: none of MLflow's job runners (SERVER_ENV; 8 more processes)
        family = [" ".join(p.cmdline()) for p in psutil.Process(proc.pid).children(recursive=True)]
        assert len(family) == 1 and not any("huey" in c or "_job_runner" in c for c in family), family
    assert proc.poll() is not None
    with pytest.raises(OSError):
        urllib.request.urlopen(f"{server.uri}/health", timeout=2)
