"""Preemption with real signals: a SIGTERM to one Ray Train worker process, and to the driver of a real `cglab train`
(jobs/pretrain.py in a subprocess), stops the run at a step boundary with a checkpoint; the MLflow run is KILLED and
tagged `preempted`; the same command resumes it, with the losses of a run that was never interrupted."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from cglab.config import dump_config, from_dict
from cglab.train.preemption import EXIT_PREEMPTED
from cglab.train.trainer import fit, history

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
STEPS = 10


@pytest.fixture(scope="module")
def ray_local():
    from cglab.raylocal import local_ray

    with local_ray(6, log_to_driver=True, configure_logging=True):
        yield


@pytest.fixture(scope="module")
def cfg(micro_sources, micro_tokenizer):
    return from_dict(
        {"data": {"sources": micro_sources, "seq_length": 64, "tokenizer": {"path": str(micro_tokenizer.path)}}},
        [
            "model.preset=tiny",
            "model.max_position_embeddings=64",
            "train.micro_batch_size=2",
            "train.global_batch_size=4",
            "train.warmup_steps=1",
            "train.lr=1e-3",
            f"train.train_steps={STEPS}",
            "parallel.data_parallel_size=2",  # two workers: the one not signalled must stop at the same step
            "data.filters.dedup=false",
            "track.system_metrics=false",
        ],
    )


@pytest.fixture(scope="module")
def clean(ray_local, cfg, tmp_path_factory):
    """Losses of the uninterrupted run."""
    out = fit(cfg, storage_path=str(tmp_path_factory.mktemp("clean")), name="clean")
    return {s: r["loss"] for s, r in history(out["run_dir"]).items()}


def _assert_resumed_exactly(run_dir, stopped_at: int, clean: dict) -> None:
    h = history(run_dir)
    assert sorted(h) == list(range(1, STEPS + 1))
    assert h[stopped_at + 1]["started_at_step"] == stopped_at  # resumed from the preemption's checkpoint
    for step in range(1, STEPS + 1):
        assert h[step]["loss"] == pytest.approx(clean[step], abs=1e-5), step


def test_sigterm_to_a_worker_checkpoints_stops_and_resumes(cfg, clean, tmp_path):
    # Rank 1 sends itself SIGTERM (a real signal, through the handler Ray Train's worker runs) after step 3.
    fault = {"step": 3, "rank": 1, "marker": str(tmp_path / "term-marker"), "mode": "term"}
    out = fit(cfg, storage_path=str(tmp_path), name="term", fault=fault, preemptible=True)
    assert (tmp_path / "term-marker").exists()
    assert out["preempted"] is True
    stopped = int(out["step"])
    assert 3 <= stopped < STEPS  # the signal lands at this step's boundary or the next one
    assert max(history(out["run_dir"])) == stopped  # both workers stopped there
    assert out["checkpoint"] and (Path(out["checkpoint"]) / "COMPLETE").exists()

    again = fit(cfg, storage_path=str(tmp_path), name="term", fault=fault, preemptible=True)
    assert again["preempted"] is False and int(again["step"]) == STEPS
    _assert_resumed_exactly(again["run_dir"], stopped, clean)


def test_sigterm_to_the_driver_exits_preempted_and_the_same_command_resumes(cfg, clean, tmp_path):
    import ray
    from mlflow import MlflowClient

    from cglab.track.server import local_server

    (tmp_path / "tiny.yaml").write_text(dump_config(cfg))
    cmd = [
        sys.executable,
        str(REPO / "jobs" / "pretrain.py"),
        str(tmp_path / "tiny.yaml"),
        "--storage",
        str(tmp_path / "runs"),
        "--name",
        "driver",
        "track.experiment=test/preempt",
    ]
    run_dir = tmp_path / "runs" / "driver"
    with local_server(tmp_path / "mlflow") as mlflow:
        env = {**os.environ, "RAY_ADDRESS": ray.get_runtime_context().gcs_address, "MLFLOW_TRACKING_URI": mlflow.uri}
        log = (tmp_path / "first.log").open("w")
        proc = subprocess.Popen(cmd, env=env, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, text=True)
        deadline = time.monotonic() + 240
        while not history(run_dir) and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.2)
        proc.send_signal(signal.SIGTERM)  # training is under way: the workers have reported a step
        rc = proc.wait(timeout=120)
        first = (tmp_path / "first.log").read_text()
        assert rc == EXIT_PREEMPTED, first[-5000:]
        assert "preempted at step" in first
        stopped = max(history(run_dir))
        assert stopped < STEPS

        client = MlflowClient(mlflow.uri)
        exp = client.get_experiment_by_name("test/preempt")
        (run,) = client.search_runs([exp.experiment_id], filter_string="tags.`cglab.run` = 'driver'")
        assert run.info.status == "KILLED"
        assert run.data.tags["preempted"] == "true" and run.data.tags["preempted_at_step"] == str(stopped)

        second = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=300)
        assert second.returncode == 0, (second.stdout + second.stderr)[-5000:]
        run = client.get_run(run.info.run_id)  # the same MLflow run, finished now
        assert run.info.status == "FINISHED" and run.data.tags["preempted"] == "false"
    _assert_resumed_exactly(run_dir, stopped, clean)
