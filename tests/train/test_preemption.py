"""Preemption with real signals: a SIGTERM to one Ray Train worker process of a real `cglab train` (jobs/pretrain.py
in a subprocess, two data-parallel workers) stops the run at a step boundary, the other worker at the same step, with
a checkpoint and exit code 75; the MLflow run is KILLED and tagged `preempted`; the same command resumes it, with the
losses of a run that was never interrupted. A SIGTERM to the driver (what a scheduler or Kubernetes signals) is
tests/clusters/test_multinode.py's: the driver of a `ray job submit`, whose worker has none of its files."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from cglab.config import dump_config
from cglab.train import preemption
from cglab.train.preemption import EXIT_PREEMPTED
from cglab.train.trainer import history

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]


def _wait_for_steps(run_dir: Path, more_than: int, proc: subprocess.Popen) -> None:
    """Until run_dir/metrics.jsonl holds more than `more_than` records: the workers are training. No window of its
    own: a run that never trains ends (its exit fails this) or meets pytest's timeout, however loaded the machine."""
    path = run_dir / "metrics.jsonl"
    while proc.poll() is None:
        if path.is_file() and len(path.read_text().splitlines()) > more_than:
            return
        time.sleep(0.05)
    raise AssertionError(f"the run ended (exit code {proc.poll()}) before its first recorded step")


def _train_worker(driver: subprocess.Popen) -> psutil.Process:
    """One Ray Train worker process of `driver`'s run: under the raylet this test started (never another session's),
    started after the driver."""
    since = psutil.Process(driver.pid).create_time()
    workers = [
        p
        for p in psutil.Process().children(recursive=True)
        if "RayTrainWorker" in " ".join(p.cmdline()) and p.create_time() >= since and p.status() != psutil.STATUS_ZOMBIE
    ]
    assert workers, "no Ray Train worker process found"
    return workers[0]


def test_sigterm_to_a_worker_checkpoints_exits_preempted_and_resumes(
    ray_local, reference_cfg, reference_losses, mlflow_server, tmp_path
):
    """The reference run (tests/train/conftest.py) preempted through one worker: it ends with the reference's losses."""
    import ray
    from mlflow import MlflowClient

    # The grace is the scheduler's window, not this test's subject (the next test's): on a loaded machine, where Ray's
    # workers run at nice 15, one step and its checkpoint took longer than 25 s.
    cfg, steps = reference_cfg.model_copy(deep=True), reference_cfg.train.train_steps
    cfg.train.preempt_grace_s = 3600.0
    (tmp_path / "tiny.yaml").write_text(dump_config(cfg))
    experiment = f"test/preempt-{tmp_path.name}"  # the session's MLflow server: an experiment of this test's own
    cmd = [
        sys.executable,
        str(REPO / "jobs" / "pretrain.py"),
        str(tmp_path / "tiny.yaml"),
        "--storage",
        str(tmp_path / "runs"),
        "--name",
        "preempt",
        f"track.experiment={experiment}",
    ]
    run_dir = tmp_path / "runs" / "preempt"
    client = MlflowClient(mlflow_server.uri)
    env = {**os.environ, "RAY_ADDRESS": ray.get_runtime_context().gcs_address, "MLFLOW_TRACKING_URI": mlflow_server.uri}

    def run_id() -> str | None:
        exp = client.get_experiment_by_name(experiment)
        runs = client.search_runs([exp.experiment_id], filter_string="tags.`cglab.run` = 'preempt'") if exp else []
        assert len(runs) <= 1  # the resumed attempt logs into the same run
        return runs[0].info.run_id if runs else None

    # 1. one of the two training workers, once it trains (the other must stop at the same step: the flag is
    # all-reduced)
    log = tmp_path / "worker.log"
    with log.open("w") as f:
        proc = subprocess.Popen(cmd, env=env, cwd=REPO, stdout=f, stderr=subprocess.STDOUT, text=True)
        try:
            _wait_for_steps(run_dir, 0, proc)
            _train_worker(proc).send_signal(signal.SIGTERM)
            rc = proc.wait()  # no window of its own: pytest's timeout bounds a run that never stops
        finally:
            proc.kill()
    assert rc == EXIT_PREEMPTED, log.read_text()[-5000:]
    assert "preempted at step" in log.read_text()
    stopped = max(history(run_dir))
    assert stopped < steps
    run = client.get_run(run_id()) if run_id() else None
    assert run is not None and run.info.status == "KILLED"
    assert run.data.tags["preempted"] == "true" and run.data.tags["preempted_at_step"] == str(stopped)

    # 2. the same command once more finishes the run, in the same MLflow run
    last = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True)
    assert last.returncode == 0, (last.stdout + last.stderr)[-5000:]
    run = client.get_run(run_id())
    assert run.info.status == "FINISHED" and run.data.tags["preempted"] == "false"
    h = history(run_dir)
    assert sorted(h) == list(range(1, steps + 1))
    assert h[stopped + 1]["started_at_step"] == stopped  # resumed from the preemption's checkpoint
    for step in range(1, steps + 1):
        assert h[step]["loss"] == pytest.approx(reference_losses[step], abs=1e-5), step


def test_a_worker_past_its_grace_exits_with_sigterms_code(tmp_path):
    """The other side of the grace: a worker whose step and checkpoint outlast train.preempt_grace_s after SIGTERM
    exits on its own, as a plain SIGTERM death would, before the scheduler's SIGKILL (the run then resumes from its
    last complete checkpoint). A process of its own: the exit ends it."""
    code = (
        "import os, signal, time\n"
        "from cglab.train import preemption\n"
        "preemption._install_worker_handler(0.5)\n"
        "os.kill(os.getpid(), signal.SIGTERM)\n"
        "assert preemption.worker_signalled()\n"
        "print('flagged', flush=True)\n"
        "time.sleep(3600)  # a step that never reaches its checkpoint\n"
    )
    p = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True)
    assert p.returncode == preemption.EXIT_GRACE_EXPIRED, p.stderr[-3000:]
    assert p.stdout == "flagged\n" and "no checkpoint within train.preempt_grace_s=0.5s" in p.stderr
