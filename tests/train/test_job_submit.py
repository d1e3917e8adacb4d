"""`ray job submit -- python jobs/pretrain.py jobs/configs/tiny_cpu.yaml` end to end, with real processes: a Ray
head started by `ray start` (127.0.0.1, free ports, private temp dir), an MLflow server on a SQL store, the micro
corpus, Ray's own job CLI. The job must succeed and its per-step metrics must be in MLflow."""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
STEPS = 3
EXPERIMENT = "test/job-submit"
RUN_NAME = "job-submit-tiny"


def _free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def _working_dir(dst: Path) -> Path:
    """What a checkout uploads: code, configs and the ignore file (which leaves `.cglab` behind)."""
    skip = shutil.ignore_patterns("__pycache__", "*.egg-info")
    for d in ("jobs", "platform"):
        shutil.copytree(REPO / d, dst / d, ignore=skip)
    shutil.copy2(REPO / ".rayignore", dst / ".rayignore")
    return dst


def _stop_group(proc: subprocess.Popen, timeout_s: float = 10.0) -> None:
    """End the process group we started, and only it. Every process of the head (GCS, raylet, dashboard, workers)
    is in that group; a graceful stop takes Ray ~30 s, so after a short grace period SIGKILL finishes the job."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            pass
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


@contextlib.contextmanager
def ray_head(tmp: Path, env: dict[str, str]):
    """`ray start --head --block` in its own session; yields the job API address."""
    gcs, dash, metrics, client, agent_http, agent_grpc, rt_agent, om, nm = _free_ports(9)
    # Logical CPUs: 1 Megatron worker + Ray Data tasks + the Train controller, as cglab.train.trainer sizes a
    # local cluster; they mostly wait on each other, so 3 on 2 cores is fine.
    cmd = [str(BIN / "ray"), "start", "--head", "--block", "--node-ip-address=127.0.0.1", f"--port={gcs}",
           "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}", f"--ray-client-server-port={client}",
           f"--metrics-export-port={metrics}", f"--dashboard-agent-listen-port={agent_http}",
           f"--dashboard-agent-grpc-port={agent_grpc}", f"--runtime-env-agent-port={rt_agent}",
           f"--object-manager-port={om}", f"--node-manager-port={nm}", "--num-cpus=3", "--num-gpus=0",
           f"--temp-dir={tmp / 'ray'}", "--disable-usage-stats"]
    log = open(tmp / "ray-head.log", "wb")
    proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    address = f"http://127.0.0.1:{dash}"
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                urllib.request.urlopen(address + "/api/version", timeout=2)
                break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    pytest.fail("ray head did not start:\n" + (tmp / "ray-head.log").read_text()[-3000:])
                time.sleep(1)
        yield address
    finally:
        _stop_group(proc)
        log.close()


def _wait_for_job(address: str, sid: str, timeout_s: float = 540.0):
    from ray.job_submission import JobStatus, JobSubmissionClient

    client = JobSubmissionClient(address)
    deadline = time.monotonic() + timeout_s
    status = client.get_job_status(sid)
    while not status.is_terminal() and time.monotonic() < deadline:
        time.sleep(2)
        status = client.get_job_status(sid)
    logs = client.get_job_logs(sid)
    if not status.is_terminal():
        client.stop_job(sid)
    return status, logs, JobStatus


@pytest.mark.slow
def test_ray_job_submit_pretrain_logs_every_step_to_mlflow():
    from mlflow import MlflowClient

    from cglab.data.corpus import build_corpus
    from cglab.track.server import local_server

    tmp = Path(tempfile.mkdtemp(prefix="cgj", dir="/tmp"))  # short: Ray's unix socket paths must fit in 107 bytes
    try:
        wd = _working_dir(tmp / "checkout")
        corpus = wd / ".cglab" / "corpus"
        build_corpus(corpus, nl_chars=250_000, code_bytes=400_000, shards=2)
        # A private throwaway cluster: no token (Ray 2.60 would write one into HOME), HOME private anyway.
        env = {**os.environ, "HOME": str(tmp / "home"), "RAY_AUTH_MODE": "disabled",
               "RAY_USAGE_STATS_ENABLED": "0", "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"}
        env.pop("RAY_ADDRESS", None)
        env.pop("MLFLOW_TRACKING_URI", None)
        with local_server(tmp / "mlflow") as mlflow, ray_head(tmp, env) as address:
            # .rayignore keeps `.cglab` out of the upload, so on one machine the job reads the corpus by absolute
            # path (on a cluster: s3:// or a shared filesystem).
            entry = ["python", "jobs/pretrain.py", "--name", RUN_NAME, "jobs/configs/tiny_cpu.yaml",
                     f"train.train_steps={STEPS}", "data.seq_length=128", f"track.experiment={EXPERIMENT}",
                     f"data.sources.0.paths=[{corpus / 'stack'}]", f"data.sources.1.paths=[{corpus / 'pile'}]"]
            sid = "cglab-pretrain-test"
            renv = {"env_vars": {"MLFLOW_TRACKING_URI": mlflow.uri}}
            r = subprocess.run([str(BIN / "ray"), "job", "submit", "--address", address, "--no-wait",
                                "--submission-id", sid, "--working-dir", str(wd),
                                "--runtime-env-json", json.dumps(renv), "--", *entry],
                               env=env, cwd=wd, capture_output=True, text=True, timeout=300)
            assert r.returncode == 0, r.stdout + r.stderr
            t0 = time.monotonic()
            status, logs, JobStatus = _wait_for_job(address, sid)
            print(f"job ran {time.monotonic() - t0:.0f}s")  # shown on failure
            assert status == JobStatus.SUCCEEDED, f"job {sid} ended {status}; log tail:\n{logs[-5000:]}"

            client = MlflowClient(mlflow.uri)
            exp = client.get_experiment_by_name(EXPERIMENT)
            assert exp is not None, f"no MLflow experiment {EXPERIMENT!r}; job log tail:\n{logs[-3000:]}"
            runs = client.search_runs([exp.experiment_id], filter_string=f"tags.`cglab.run` = '{RUN_NAME}'")
            assert len(runs) == 1, [r.info.run_name for r in runs]
            run = runs[0]
            assert run.info.status == "FINISHED"
            assert run.data.params["train.train_steps"] == str(STEPS)
            losses = client.get_metric_history(run.info.run_id, "loss")
            assert sorted(m.step for m in losses) == list(range(1, STEPS + 1))
            assert all(0 < m.value < 20 for m in losses), [m.value for m in losses]
            steps = client.get_metric_history(run.info.run_id, "step")
            assert sorted(m.value for m in steps) == list(range(1, STEPS + 1))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
