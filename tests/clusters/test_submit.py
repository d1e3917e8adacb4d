"""README's "On one machine" against the real recipe: `clusters/local.sh start` (a Ray head with token auth and
everything on 127.0.0.1, plus MLflow on a SQL store), then `ray job submit --working-dir .` from a checkout that holds
a corpus, a venv, checkpoints and MLflow stores uploads only the code, and `ray job submit -- python jobs/pretrain.py
jobs/configs/tiny_cpu.yaml` trains and logs every step to the recipe's MLflow. One head for the whole module."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from cglab import submit as S
from tests.clusters.ray_head import auth_headers, free_ports, head_env, job_checkout, submit_job, wait_for_job
from tests.track.dashboard import corpus_with_a_bad_record, expected_series, scrape, series

REPO = Path(__file__).resolve().parents[2]
RAY = str(Path(sys.executable).with_name("ray"))
MIB = 1024 * 1024
# Incompressible junk where a checkout keeps its heavy state; any one of these leaking breaks the size bound.
DUMMIES = [
    ".venv/lib/python3.11/site-packages/torch/lib/libtorch.so",
    ".cglab/corpus/pile/00.jsonl.zst",
    ".cglab/corpus/stack/00.parquet",
    "checkpoints/step_10/__0_0.distcp",
    "mlruns/1/abc/artifacts/model.pt",
    "mlflow.db",
    ".git/objects/pack/pack-1.pack",
]
DUMMY_BYTES = 5 * MIB
MAX_PACKAGE_MIB = 4.0


def _checkout_copy(dst: Path) -> Path:
    """The files a fresh clone plus the working tree would have (tracked and untracked-but-not-ignored)."""
    files = (
        subprocess.run(
            ["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=REPO, check=True, capture_output=True
        )
        .stdout.decode()
        .split("\0")
    )
    for rel in filter(None, files):
        src = REPO / rel
        if src.is_file():
            (dst / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dst / rel)
    for rel in DUMMIES:
        (dst / rel).parent.mkdir(parents=True, exist_ok=True)
        (dst / rel).write_bytes(os.urandom(DUMMY_BYTES))
    return dst


def _listening(port: int) -> set[str]:
    import psutil

    return {
        c.laddr.ip
        for c in psutil.net_connections(kind="tcp")
        if c.status == psutil.CONN_LISTEN and c.laddr.port == port
    }


@pytest.fixture(scope="module")
def ray_head():
    """The local recipe (clusters/local.sh) on free ports with a private HOME and temp dir: a Ray head with token
    auth and the driver slots, plus MLflow (the pretrain job logs there). Stopped with the recipe's own `stop`."""
    tmp = Path(tempfile.mkdtemp(prefix="cgs", dir="/tmp"))  # short: Ray's unix socket paths must fit in 107 bytes
    gcs, dash, metrics, client, mlflow, agent_http, agent_grpc, rt_agent, om, nm = free_ports(10)
    # head_env: the token in this private HOME, the venv's `python` on PATH, and no outside RAY_ADDRESS or
    # MLFLOW_TRACKING_URI inherited by the head, hence by the jobs it runs.
    env = head_env(
        tmp,
        HOME=str(tmp),
        RAY_PACKAGE_SIZE_WARNING_MIB="0",
        BIN=str(Path(sys.executable).parent),
        CGLAB_STATE=str(tmp / "state"),
        RAY_PORT=str(gcs),
        DASHBOARD_PORT=str(dash),
        METRICS_PORT=str(metrics),
        CLIENT_PORT=str(client),
        MLFLOW_PORT=str(mlflow),
        # the teardown kills this private head after 3 s instead of waiting out Ray's ~30 s graceful stop (CI time)
        STOP_WAIT_S="3",
        # 2 CPUs: the pretrain job's Train worker holds one while its Ray Data read tasks (1 CPU each) need another;
        # the other jobs here ask for none (a driver slot only).
        RAY_START_ARGS=f"--num-cpus=2 --num-gpus=0 --temp-dir={tmp}/ray --dashboard-agent-listen-port="
        f"{agent_http} --dashboard-agent-grpc-port={agent_grpc} --runtime-env-agent-port="
        f"{rt_agent} --object-manager-port={om} --node-manager-port={nm}",
    )
    recipe = [str(REPO / "clusters" / "local.sh")]
    address = f"http://127.0.0.1:{dash}"
    try:
        r = subprocess.run(recipe + ["start"], env=env, cwd=REPO, capture_output=True, text=True, timeout=180)
        assert r.returncode == 0, r.stdout + r.stderr
        deadline = time.monotonic() + 60
        while not (_listening(dash) and _listening(mlflow)) and time.monotonic() < deadline:
            time.sleep(1)
        yield {
            "address": address,
            "gcs_port": gcs,
            "metrics_port": metrics,
            "mlflow_uri": f"http://127.0.0.1:{mlflow}",
            "env": env,
            "tmp": tmp,
            "ports": {"dashboard": dash, "mlflow": mlflow},
        }
    finally:
        subprocess.run(recipe + ["stop"], env=env, cwd=REPO, timeout=60)
        shutil.rmtree(tmp, ignore_errors=True)


@pytest.mark.slow
def test_local_recipe_listens_on_loopback_and_requires_the_token(ray_head):
    # The job API (which runs arbitrary code) and MLflow are loopback-only. Ray 2.60's GCS, client server and
    # metrics endpoint bind the node's addresses whatever we pass; they are covered by token auth / firewall.
    for name, port in ray_head["ports"].items():
        assert _listening(port) == {"127.0.0.1"}, f"{name} (port {port}) listens on {_listening(port)}"
    # The job API refuses a caller without the token; the token file was generated into the private HOME.
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(ray_head["address"] + "/api/jobs/", timeout=10)
    assert err.value.code in (401, 403)
    token = (ray_head["tmp"] / ".ray" / "auth_token").read_text().strip()
    req = urllib.request.Request(ray_head["address"] + "/api/jobs/", headers={"Authorization": f"Bearer {token}"})
    assert urllib.request.urlopen(req, timeout=10).status == 200


def _package_mib(output: str) -> float:
    """Total size of the packages Ray built, from its own log line (RAY_PACKAGE_SIZE_WARNING_MIB=0 makes Ray
    report every package it zips, not only those near its limit)."""
    sizes = re.findall(r"The runtime_env package for '[^']+' at '[^']+' is ([\d.]+)MiB", output)
    assert sizes, f"no package size in ray's output:\n{output[-3000:]}"
    return sum(map(float, sizes))


@pytest.mark.slow
def test_plain_ray_job_submit_uploads_only_code(ray_head, tmp_path):
    """Ray's own CLI, no cglab helper: the default excludes, .gitignore and .rayignore must do it."""
    repo = _checkout_copy(tmp_path / "repo")
    heavy = sum((repo / d).stat().st_size for d in DUMMIES) / MIB
    probe = ("import os; print('LISTING', json.dumps(sorted(os.listdir('.'))))").replace("json", "__import__('json')")
    r = subprocess.run(
        [
            RAY,
            "job",
            "submit",
            "--address",
            ray_head["address"],
            "--working-dir",
            str(repo),
            "--entrypoint-resources",
            json.dumps(S.entrypoint_resources()),
            "--",
            "python",
            "-c",
            probe,
        ],
        env=ray_head["env"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    out = r.stdout + r.stderr
    assert r.returncode == 0, out[-4000:]
    size = _package_mib(out)
    assert size < MAX_PACKAGE_MIB, f"uploaded {size} MiB (checkout holds {heavy:.0f} MiB of data)"
    listing = json.loads(re.search(r"LISTING (\[.*\])", out).group(1))
    assert "platform" in listing and "Makefile" in listing
    leaked = {".git", ".venv", ".cglab", "checkpoints", "mlruns", "mlflow.db"} & set(listing)
    assert not leaked, f"uploaded to the cluster: {sorted(leaked)}"


@pytest.mark.slow
def test_submit_helper_places_driver_and_ships_checkout_package(ray_head, tmp_path, monkeypatch):
    """cglab.submit: explicit excludes (works even if Ray ignored .gitignore), cglab from the checkout."""
    repo = _checkout_copy(tmp_path / "repo")
    (repo / ".rayignore").unlink()  # the helper must not depend on the ignore file
    for k in ("RAY_AUTH_MODE", "HOME", "RAY_PACKAGE_SIZE_WARNING_MIB"):
        monkeypatch.setenv(k, ray_head["env"][k])
    monkeypatch.setenv("RAY_RUNTIME_ENV_IGNORE_GITIGNORE", "1")
    code = (
        "import cglab, os, ray; ray.init(); "
        "print('CGLAB', cglab.__file__); "
        "print('DRIVER_SLOTS_FREE', ray.available_resources().get('cglab_driver')); "
        "print('LISTING', sorted(os.listdir('.')))"
    )
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "cglab.submit",
            "--address",
            ray_head["address"],
            "--working-dir",
            str(repo),
            "--",
            sys.executable,
            "-c",
            code,
        ],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ},
    )
    out = r.stdout + r.stderr
    assert r.returncode == 0, out[-4000:]
    size = _package_mib(out)
    assert size < MAX_PACKAGE_MIB, f"uploaded {size} MiB"
    cglab_file = re.search(r"CGLAB (\S+)", out).group(1)
    assert not cglab_file.startswith(str(REPO)), f"job imported the installed cglab, not the upload: {cglab_file}"
    # The head offers 4 driver slots; this job's supervisor holds one while it runs.
    assert re.search(r"DRIVER_SLOTS_FREE (\S+)", out).group(1) == "3.0", out[-2000:]
    listing = re.search(r"LISTING (\[.*\])", out).group(1)
    for name in (".cglab", "checkpoints", "mlruns", "mlflow.db", ".venv", ".git"):
        assert f"'{name}'" not in listing, f"{name} uploaded: {listing}"


JOB_STEPS, JOB_SEQ, JOB_GLOBAL_BATCH = 3, 128, 8  # tiny_cpu.yaml's sequence length and global batch
JOB_EXPERIMENT = "test/job-submit"  # this module's own experiment
JOB_RUN_NAME = "job-submit-tiny"


@pytest.fixture(scope="module")
def pretrain_job(ray_head, tmp_path_factory):
    """`ray job submit -- python jobs/pretrain.py jobs/configs/tiny_cpu.yaml` with Ray's own CLI on the recipe's head,
    on the micro corpus with one malformed Pile record; the head's Prometheus endpoint (what the Grafana dashboard
    reads) scraped while the job runs, and after it until the last step's values are in. Two tests read it: the run
    in the recipe's MLflow, and the dashboard's series."""
    tmp = tmp_path_factory.mktemp("pretrain-job")
    wd = job_checkout(tmp / "checkout")
    corpus = corpus_with_a_bad_record(tmp / "corpus")
    env = ray_head["env"]
    # .rayignore keeps `.cglab` out of the upload, so on one machine the job reads the corpus by absolute path (on a
    # cluster: s3:// or a shared filesystem).
    entry = [
        "python",
        "jobs/pretrain.py",
        "--name",
        JOB_RUN_NAME,
        "jobs/configs/tiny_cpu.yaml",
        f"train.train_steps={JOB_STEPS}",
        f"data.seq_length={JOB_SEQ}",
        f"train.global_batch_size={JOB_GLOBAL_BATCH}",
        f"track.experiment={JOB_EXPERIMENT}",
        f"data.sources.0.paths=[{corpus / 'stack'}]",
        f"data.sources.1.paths=[{corpus / 'pile'}]",
    ]
    sid = "cglab-pretrain-test"
    seen: dict[tuple, float] = {}  # the latest value of every cglab series, by (name, labels)
    port = ray_head["metrics_port"]
    submit_job(ray_head["address"], sid, wd, {"MLFLOW_TRACKING_URI": ray_head["mlflow_uri"]}, entry, env)
    status, logs = wait_for_job(
        ray_head["address"], auth_headers(env), sid, while_running=lambda: seen.update(scrape(port))
    )
    # Workers push metrics to the node's agent every few seconds and the run is short: after its end, until the
    # counter that moves last in TrainMetrics.report has its final value (so the last step's gauges are in too).
    tags = dict(experiment=JOB_EXPERIMENT, trial=JOB_RUN_NAME, rank="0")
    final_tokens = [JOB_STEPS * JOB_GLOBAL_BATCH * JOB_SEQ]
    deadline = time.monotonic() + 60  # Ray's export interval is ~10 s
    while status.value == "SUCCEEDED" and time.monotonic() < deadline:
        seen.update(scrape(port))
        if expected_series() <= {n for n, _ in seen} and series(seen, "ray_cglab_tokens_total", **tags) == final_tokens:
            break
        time.sleep(2)
    return {"status": status, "logs": logs, "seen": seen, "tags": tags}


@pytest.mark.slow
def test_ray_job_submit_pretrain_logs_every_step_to_mlflow(ray_head, pretrain_job, tmp_path):
    """The job must succeed and its per-step metrics must be in the recipe's MLflow."""
    from mlflow import MlflowClient
    from ray.job_submission import JobStatus

    status, logs = pretrain_job["status"], pretrain_job["logs"]
    assert status == JobStatus.SUCCEEDED, f"job ended {status}; log tail:\n{logs[-5000:]}"
    # Its driver joined this head (the job supervisor points RAY_ADDRESS at it), not another Ray nor one of its own.
    joined = re.search(r"Connecting to existing Ray cluster at address: [\w.-]+:(\d+)", logs)
    assert joined and int(joined.group(1)) == ray_head["gcs_port"], logs[:3000]
    # It ran in the uploaded copy (Ray's working_dir), where jobs/pretrain.py imports cglab from.
    run_dir = re.search(r'"run_dir": "([^"]+)"', logs)
    assert run_dir and "/working_dir_files/" in run_dir.group(1), logs[-3000:]

    client = MlflowClient(ray_head["mlflow_uri"])
    exp = client.get_experiment_by_name(JOB_EXPERIMENT)
    assert exp is not None, f"no MLflow experiment {JOB_EXPERIMENT!r}; job log tail:\n{logs[-3000:]}"
    runs = client.search_runs([exp.experiment_id], filter_string=f"tags.`cglab.run` = '{JOB_RUN_NAME}'")
    assert len(runs) == 1, [r.info.run_name for r in runs]
    run = runs[0]
    assert run.info.status == "FINISHED"
    assert run.data.params["train.train_steps"] == str(JOB_STEPS)
    losses = client.get_metric_history(run.info.run_id, "loss")
    assert sorted(m.step for m in losses) == list(range(1, JOB_STEPS + 1))
    assert all(0 < m.value < 20 for m in losses), [m.value for m in losses]
    steps = client.get_metric_history(run.info.run_id, "step")
    assert sorted(m.value for m in steps) == list(range(1, JOB_STEPS + 1))
    # the preflight it passed, what the stream really masked, and how much of each source it read
    plan = json.loads(Path(client.download_artifacts(run.info.run_id, "plan.json", str(tmp_path))).read_text())
    assert plan["errors"] == [] and plan["attention_backend"]["backend"] == "sdpa"
    assert [m["objective"] for m in plan["mask_fraction"]] == ["span"]
    assert 0 < run.data.metrics["mask_fraction/span"] < 1
    passes = dict(p.split("=") for p in run.data.tags["data.passes"].split(","))
    # 3 steps of 8 windows: a few long Stack files can fill them all, so a source may not be reached yet
    assert set(passes) == {"stack", "pile"} and all(0 <= float(v) < 1 for v in passes.values()), passes
    assert float(passes["stack"]) > 0, passes
    assert run.data.tags["data.epochs"] == "1"


@pytest.mark.slow
def test_every_dashboard_metric_is_scraped_from_a_live_training_run(pretrain_job):
    """Every series the Grafana dashboard queries is on the recipe head's Prometheus endpoint, with the values the
    job must have produced (tests/track/test_metrics.py checks the names and the dashboard without Ray)."""
    assert pretrain_job["status"].value == "SUCCEEDED", pretrain_job["logs"][-5000:]
    seen, tags = pretrain_job["seen"], pretrain_job["tags"]
    missing = expected_series() - {n for n, _ in seen}
    assert not missing, f"series the dashboard queries but the run did not export: {sorted(missing)}"

    def value(name, **labels):
        vals = series(seen, name, **labels)
        assert len(vals) == 1, (name, labels, vals)
        return vals[0]

    assert value("ray_cglab_step", **tags) == JOB_STEPS
    assert value("ray_cglab_tokens_total", **tags) == JOB_STEPS * JOB_GLOBAL_BATCH * JOB_SEQ
    assert value("ray_cglab_step_duration_seconds_count", **tags) == JOB_STEPS
    assert 0 < value("ray_cglab_loss", **tags) < 20
    assert value("ray_cglab_learning_rate", **tags) > 0
    assert value("ray_cglab_grad_norm", **tags) > 0
    assert value("ray_cglab_checkpoint_seconds", **tags) > 0  # saved at the last step
    step_time = value("ray_cglab_step_time_seconds", **tags)
    assert 0 <= value("ray_cglab_data_wait_seconds", **tags) <= step_time
    assert value("ray_cglab_tokens_per_second", **tags) == pytest.approx(JOB_GLOBAL_BATCH * JOB_SEQ / step_time)

    # Data side, per source (the config's source names): skips counted once, as the run's start prepares the
    # corpus (cglab.data.prepared); kept documents as the stream's read tasks read them. Each task's process
    # exports its own series (Ray adds a WorkerId label); the dashboard sums them, and so do we.
    exp = tags["experiment"]
    skipped = series(seen, "ray_cglab_samples_skipped_total", experiment=exp, source="pile", reason="malformed_json")
    assert sum(skipped) == 1
    for source in ("stack", "pile"):
        assert sum(series(seen, "ray_cglab_samples_kept_total", experiment=exp, source=source)) > 0


def test_runtime_env_rejects_a_directory_that_is_not_a_checkout(tmp_path):
    with pytest.raises(ValueError, match="not a cglab checkout"):
        S.runtime_env(tmp_path)


def test_rayignore_and_helper_excludes_agree():
    lines = [ln.strip() for ln in (REPO / ".rayignore").read_text().splitlines()]
    patterns = [ln for ln in lines if ln and not ln.startswith("#")]
    assert sorted(patterns) == sorted(S.EXCLUDES)


def test_cli_command_is_a_valid_ray_job_submit():
    argv = S.cli_command(["python", "jobs/ablate.py", "--lesson", "3"])
    assert argv[:3] == ["ray", "job", "submit"] and argv[-4:] == ["python", "jobs/ablate.py", "--lesson", "3"]
    env = json.loads(argv[argv.index("--runtime-env-json") + 1])
    assert ".cglab" in env["excludes"] and env["py_modules"] == ["platform/cglab"]
