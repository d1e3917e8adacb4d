"""`ray job submit -- python jobs/pretrain.py jobs/configs/tiny_cpu.yaml` end to end, as README's "On one machine"
runs it, with real processes: a Ray head started by `ray start` with clusters/local.sh's flags (127.0.0.1, token
auth, free ports, private temp dir), an MLflow server on a SQL store, the micro corpus, Ray's own job CLI. The job
must succeed and its per-step metrics must be in MLflow."""

from __future__ import annotations

import json
import re
import shutil
import tempfile
from pathlib import Path

import pytest

from tests.clusters.ray_head import auth_headers, head_env, job_checkout, ray_head, submit_job, wait_for_job

STEPS = 3
EXPERIMENT = "test/job-submit"
RUN_NAME = "job-submit-tiny"


@pytest.mark.slow
def test_ray_job_submit_pretrain_logs_every_step_to_mlflow():
    from mlflow import MlflowClient
    from ray.job_submission import JobStatus

    from cglab.data.corpus import build_corpus
    from cglab.track.server import local_server

    tmp = Path(tempfile.mkdtemp(prefix="cgj", dir="/tmp"))  # short: Ray's unix socket paths must fit in 107 bytes
    try:
        wd = job_checkout(tmp / "checkout")
        corpus = wd / ".cglab" / "corpus"
        build_corpus(corpus, nl_chars=250_000, code_bytes=400_000, shards=2)
        env = head_env(tmp)
        with local_server(tmp / "mlflow", start_timeout_s=None) as mlflow, ray_head(tmp, env) as head:
            # .rayignore keeps `.cglab` out of the upload, so on one machine the job reads the corpus by absolute
            # path (on a cluster: s3:// or a shared filesystem).
            entry = [
                "python",
                "jobs/pretrain.py",
                "--name",
                RUN_NAME,
                "jobs/configs/tiny_cpu.yaml",
                f"train.train_steps={STEPS}",
                f"track.experiment={EXPERIMENT}",
                f"data.sources.0.paths=[{corpus / 'stack'}]",
                f"data.sources.1.paths=[{corpus / 'pile'}]",
            ]
            sid = "cglab-pretrain-test"
            submit_job(head.address, sid, wd, {"MLFLOW_TRACKING_URI": mlflow.uri}, entry, env)
            status, logs = wait_for_job(head.address, auth_headers(env), sid)
            assert status == JobStatus.SUCCEEDED, f"job {sid} ended {status}; log tail:\n{logs[-5000:]}"
            # It ran in the uploaded copy (Ray's working_dir), where jobs/pretrain.py imports cglab from.
            run_dir = re.search(r'"run_dir": "([^"]+)"', logs)
            assert run_dir and "/working_dir_files/" in run_dir.group(1), logs[-3000:]

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
            # the preflight it passed, what the stream really masked, and how much of each source it read
            plan = json.loads(Path(client.download_artifacts(run.info.run_id, "plan.json", str(tmp))).read_text())
            assert plan["errors"] == [] and plan["attention_backend"]["backend"] == "sdpa"
            assert [m["objective"] for m in plan["mask_fraction"]] == ["span"]
            assert 0 < run.data.metrics["mask_fraction/span"] < 1
            passes = dict(p.split("=") for p in run.data.tags["data.passes"].split(","))
            # 3 steps of 8 windows: a few long Stack files can fill them all, so a source may not be reached yet
            assert set(passes) == {"stack", "pile"} and all(0 <= float(v) < 1 for v in passes.values()), passes
            assert float(passes["stack"]) > 0, passes
            assert run.data.tags["data.epochs"] == "1"
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
