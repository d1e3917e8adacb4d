"""On the multi-node test bed (tests/clusters/multinode.py: a head with 0 CPUs, two worker nodes that cannot see
the driver's files, S3 storage, an MLflow server on 127.0.0.1): `jobs/pretrain.py` through `ray job submit`,
preempted (`ray job stop`: SIGTERM to its driver) and resumed with `cglab train`; `cglab ablate 2` evaluating while
it trains, then `cglab report`; a worker node killed mid-run.
Everything a worker reads must come through the storage URI.

Two training runs of one config (`_cfg`): the preempted one (module fixture `preempted`) and the one that loses a
node; each is the other's uninterrupted reference where it resumed (see the node test)."""

from __future__ import annotations

import contextlib
import io
import json
import re
import subprocess
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from cglab import storage
from cglab.config import dump_config, from_dict
from tests.clusters.conftest import driver_on
from tests.clusters.ray_head import BIN, job_checkout, submit_job, wait_for_job

# own_cluster: its Ray is only the test bed's own `ray start` nodes (ports and --temp-dir of their own, drivers given
# its address), so `make test` runs it beside the tests that start a local Ray (Makefile: RAY_TESTS)
pytestmark = [pytest.mark.slow, pytest.mark.own_cluster]

STEPS, EVERY = 16, 2  # the shared run's train.train_steps and train.checkpoint_every
EXPERIMENT = "test/multinode"


def _on(node: str):
    """Ray options that pin a task to a worker node (its custom resource)."""
    return {"resources": {node: 0.01}, "num_cpus": 0}


def test_worker_nodes_see_the_bucket_and_not_the_driver(on_cluster, tmp_path):
    """The bed itself: a file the driver writes locally does not exist on a worker node; an object in the bucket
    does, through the nodes' own AWS_* env."""
    import pyarrow.fs as pafs
    import ray

    local = tmp_path / "driver-only.txt"
    local.write_text("x")
    with on_cluster.s3().open_output_stream(f"{on_cluster.bucket}/probe/x.txt") as f:
        f.write(b"from the driver")

    @ray.remote
    def look(path: str, uri: str):
        import os

        fs, p = pafs.FileSystem.from_uri(uri)
        with fs.open_input_stream(p) as f:
            return os.path.exists(path), f.read(), os.environ["HOME"]

    for node in ("node_a", "node_b"):
        seen, data, home = ray.get(
            look.options(**_on(node)).remote(str(local), f"s3://{on_cluster.bucket}/probe/x.txt")
        )
        assert (seen, data) == (False, b"from the driver")
        assert home == str(on_cluster.nodes[node].scratch / "home")


def test_the_stop_flag_lives_on_the_drivers_node(on_cluster):
    """Rank 0 reads the driver's StopFlag at every step, so a worker node lost mid-run must not take the flag with
    it: every flag goes to the driver's node (the head, 0 CPUs), none to the worker nodes Ray would also pick."""
    import ray
    from ray.util.state import list_actors

    from cglab.train import preemption

    flags = [preemption.stop_flag() for _ in range(8)]
    assert ray.get([f.is_set.remote() for f in flags]) == [False] * 8
    ids = {f._actor_id.hex() for f in flags}
    placed = {
        a.actor_id: a.node_id for a in list_actors(filters=[("class_name", "=", "StopFlag")]) if a.actor_id in ids
    }
    assert set(placed.values()) == {ray.get_runtime_context().get_node_id()}, placed
    assert len(placed) == 8
    for f in flags:
        ray.kill(f)


@pytest.fixture(scope="module")
def s3_sources(cluster, micro_corpus):
    """data.sources of the micro corpus copied to the bucket (uploaded once per module)."""
    data = cluster.upload(micro_corpus["out"], "data")
    return [
        {"name": "pile", "kind": "pile", "paths": [f"{data}/pile"]},
        {"name": "stack", "kind": "stack", "paths": [f"{data}/stack"]},
    ]


def _cfg(s3_sources):
    """The config both training runs use: one training worker (the node test kills the node it is on), a
    checkpoint every EVERY steps and a record every step (MLflow gets each step's loss)."""
    return from_dict(
        {"data": {"sources": s3_sources, "seq_length": 64, "tokenizer": {"vocab_size": 1024, "train_docs": 300}}},
        [
            "model.preset=tiny",
            "model.max_position_embeddings=64",
            "train.micro_batch_size=2",
            "train.global_batch_size=2",
            "train.warmup_steps=1",
            f"train.train_steps={STEPS}",
            f"train.checkpoint_every={EVERY}",
            "train.log_every=1",
            "train.max_failures=1",
            "data.filters.dedup=false",
            "track.system_metrics=false",
            f"track.experiment={EXPERIMENT}",
        ],
    )


def _train(cfg_path, storage: str, name: str, *overrides: str) -> dict:
    """`cglab train` in this process (the function the console script calls); its printed result (the JSON object
    between a line `{` and a line `}`: Ray's log lines, which start with `(`, can come between)."""
    from cglab.cli import main

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        rc = main(["train", "--storage", storage, "--name", name, str(cfg_path), *overrides])
    assert rc == 0, out.getvalue()[-3000:]
    return json.loads(re.search(r"^\{$.*?^\}$", out.getvalue(), re.M | re.S).group(0))


def _checkpoint_steps(cluster, prefix: str) -> list[int]:
    """The steps of the complete checkpoints under `s3://bucket/prefix/` (what each one's trainer_state.json says)."""
    from cglab.train import checkpoint

    done = [k.removesuffix(checkpoint.MARKER) for k in cluster.keys(prefix) if k.endswith("/" + checkpoint.MARKER)]
    return sorted(
        json.loads(storage.read_bytes(f"s3://{cluster.bucket}/{d}{checkpoint.STATE}"))["step"]
        for d in done
        if "/checkpoint_" in d
    )


def _mlflow_run(client, name: str):
    """The one MLflow run `cglab train --name NAME` logs to in EXPERIMENT (a resumed run logs into the same)."""
    exp = client.get_experiment_by_name(EXPERIMENT)
    runs = client.search_runs([exp.experiment_id], filter_string=f"tags.`cglab.run` = '{name}'") if exp else []
    assert len(runs) == 1, [r.info.run_id for r in runs]
    return runs[0]


def _losses(client, run) -> dict[int, list[float]]:
    """Every loss MLflow holds for `run`, by step (a step re-run after a restart is there twice)."""
    out: dict[int, list[float]] = {}
    for m in client.get_metric_history(run.info.run_id, "loss"):
        out.setdefault(m.step, []).append(m.value)
    return out


@dataclass
class Preempted:
    """What the module fixture `preempted` saw; its test asserts on it."""

    storage: str
    cfg_yaml: str
    job_status: str
    job_log: str
    steps_in_bucket: list[int]  # complete checkpoints' steps when the job had ended
    stopped: object  # the MLflow run then
    resumed: dict  # `cglab train`'s result
    finished: object  # the MLflow run at the end
    losses: dict[int, list[float]]
    fetched: Path  # the newest checkpoint at the end, fetched from the bucket


@pytest.fixture(scope="module")
def preempted(cluster, s3_sources, mlflow_server, tmp_path_factory) -> Preempted:
    """`ray job submit ... -- python jobs/pretrain.py` (the upload: code and the config), `ray job stop` once a
    checkpoint is in the bucket, then the same run resumed with `cglab train` in this process."""
    from mlflow import MlflowClient
    from ray.job_submission import JobSubmissionClient
    from ray.train import Checkpoint

    where = tmp_path_factory.mktemp("preempted")
    cfg_yaml = dump_config(_cfg(s3_sources))
    wd = job_checkout(where / "checkout")
    (wd / "mn.yaml").write_text(cfg_yaml)
    run_storage = f"s3://{cluster.bucket}/runs"
    sid = "cglab-multinode-pretrain"
    entry = ["python", "jobs/pretrain.py", "--storage", run_storage, "--name", "mn", "mn.yaml"]
    submit_job(cluster.address, sid, wd, {"MLFLOW_TRACKING_URI": mlflow_server.uri}, entry, cluster.env)
    jobs = JobSubmissionClient(cluster.address)
    # training, and a checkpoint to stop after is in the bucket (no window: a job that never gets there ends, and its
    # status fails this; one that hangs meets pytest's timeout)
    while not _checkpoint_steps(cluster, "runs/mn"):
        status = jobs.get_job_status(sid)
        assert not status.is_terminal(), (status, jobs.get_job_logs(sid)[-5000:])
        time.sleep(0.5)
    # `ray job stop`, Ray's CLI as a user runs it: the job supervisor SIGTERMs the driver and, as the recipes' heads
    # do (RAY_JOB_STOP_WAIT_TIME_S, tests/clusters/multinode.py), waits for it to checkpoint before any SIGKILL
    stop = [str(BIN / "ray"), "job", "stop", "--address", cluster.address, "--no-wait", sid]
    r = subprocess.run(stop, env=cluster.env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    status, log = wait_for_job(cluster.address, {}, sid)
    steps_in_bucket = _checkpoint_steps(cluster, "runs/mn")
    client = MlflowClient(mlflow_server.uri)
    stopped = _mlflow_run(client, "mn")

    with driver_on(cluster, where), pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_TRACKING_URI", mlflow_server.uri)
        cfg_path = Path.cwd() / "mn.yaml"  # the driver's working directory: hidden from the worker nodes
        cfg_path.write_text(cfg_yaml)
        resumed = _train(cfg_path, run_storage, "mn")
    finished = _mlflow_run(client, "mn")
    newest = Checkpoint(resumed["checkpoint"]).to_directory(str(where / "fetched"))
    return Preempted(
        run_storage,
        cfg_yaml,
        status.value,
        log,
        steps_in_bucket,
        stopped,
        resumed,
        finished,
        _losses(client, finished),
        Path(newest),
    )


def test_a_ray_job_preempted_stops_with_a_checkpoint_in_the_bucket_and_cglab_train_resumes_it(preempted, cluster):
    """`ray job stop`: the job's driver, SIGTERMed by Ray's job supervisor, has the worker (on a node without the
    driver's files) stop at a step boundary with a checkpoint in the bucket before the supervisor's wait is out, and
    leaves its MLflow run KILLED and tagged; `cglab train` with the same name resumes from that checkpoint and
    finishes the same MLflow run with every step's loss. (Exit code 75 is test_preemption's: a stopped job has none.)"""
    from cglab.train import checkpoint

    p = preempted
    assert p.job_status == "STOPPED", p.job_log[-5000:]
    stop = re.search(r"cglab train: preempted at step (\d+), checkpoint saved", p.job_log)
    assert stop, p.job_log[-5000:]
    at = int(stop.group(1))
    assert EVERY <= at < STEPS  # signalled once the first checkpoint was in the bucket
    assert p.steps_in_bucket[-1] == at and len(p.steps_in_bucket) <= 2  # the stop checkpoint, train.keep_last
    assert p.stopped.info.status == "KILLED"
    assert (p.stopped.data.tags["preempted"], p.stopped.data.tags["preempted_at_step"]) == ("true", str(at))

    assert (p.resumed["step"], p.resumed["started_at_step"]) == (STEPS, at)
    assert p.resumed["checkpoint"].startswith(f"{p.storage}/mn/checkpoint_")  # a URI any node opens
    assert p.finished.info.run_id == p.stopped.info.run_id
    assert (p.finished.info.status, p.finished.data.tags["preempted"]) == ("FINISHED", "false")
    assert sorted(p.losses) == list(range(1, STEPS + 1)) and all(len(v) == 1 for v in p.losses.values())
    # the newest checkpoint, fetched from the bucket, is whole: every file its manifest lists, at its size
    assert checkpoint.verify(p.fetched)["files"]
    assert _checkpoint_steps(cluster, "runs/mn")[-1] == STEPS
    # the prepared corpus went with the run's storage, where every node reads it
    assert any(k.startswith("runs/corpus/tokens-") and k.endswith("/COMPLETE") for k in cluster.keys("runs/corpus"))


def test_ablate_reads_its_inputs_from_the_bucket_and_report_reads_it_back(
    on_cluster, s3_sources, mlflow_server, monkeypatch
):
    """`cglab ablate 2 --preset laptop --storage-path s3://...` (one trial, a few steps): the held-out split and the
    tokenizer the driver settles are in the bucket, beside the experiment, and the trial, on a worker node, trains
    and evaluates with them; `cglab report` then reads the sweep back from MLflow, the evaluation while training
    (a Ray task on a worker node) among its curves."""
    from cglab.cli import main
    from cglab.tune.results import collect

    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server.uri)
    (Path.cwd() / "data.yaml").write_text(
        dump_config(from_dict({"data": {"sources": s3_sources, "tokenizer": {"vocab_size": 1024, "train_docs": 300}}}))
    )
    # a short trial that evaluates while it trains (step 2, a Ray task on whichever node Ray picks) and at its end
    steps = ["train.train_steps=4", "train.warmup_steps=1", "eval.every=2"]
    where = ["--config", "data.yaml", "--storage-path", f"s3://{on_cluster.bucket}/tune", "--name", "l2"]
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        rc = main(["ablate", "2", *steps, "--preset", "laptop", *where, "--variants", "clm", "--seeds", "0"])
    assert rc == 0, out.getvalue()[-4000:]
    keys = on_cluster.keys("tune")
    assert "tune/l2-inputs/tokenizer/tokenizer.json" in keys
    for name in ("nl.jsonl", "code.jsonl"):  # the held-out split, beside the prepared corpus in the bucket
        assert any(k.startswith("tune/corpus/tokens-") and "/heldout-" in k and k.endswith(name) for k in keys)
    assert any(k.startswith("tune/l2-train/") and k.endswith("/COMPLETE") for k in keys)
    # the evaluation while training went through the bucket: its record is there, its snapshot deleted
    records = [k for k in keys if k.startswith("tune/l2-train/") and "/eval_records/step_000002.json" in k]
    assert len(records) == 1 and not any("/evals/step_" in k for k in keys)
    rec = json.loads(storage.read_bytes(f"s3://{on_cluster.bucket}/{records[0]}"))
    assert "error" not in rec and rec["metrics"]["eval/code_bpb"] > 0

    report = io.StringIO()
    with contextlib.redirect_stdout(report):
        rc = main(["report", "--lesson", "2", "--sweep", "l2"])
    assert rc == 0, report.getvalue()[-3000:]
    assert any(line.startswith("clm ") for line in report.getvalue().splitlines())
    assert (Path.cwd() / "dashboards/lesson-2.html").is_file()
    # the curve the report plots: the evaluation at step 2 (its record in the bucket), then the trial's final one
    curve = collect(2, mlflow_server.uri, "l2").histories["eval/code_bpb"]["clm"]
    (points,) = curve.values()
    assert len(points) == 2 and points[0][1] == pytest.approx(rec["metrics"]["eval/code_bpb"], rel=1e-6)


def _registered_step(cluster, prefix: str) -> int:
    """The step of the newest checkpoint Ray Train has registered (what a restarted worker gets back), from the
    snapshot its controller writes to the run's storage; 0 before any. A checkpoint complete in the bucket but not yet
    registered is not handed back to a restarted worker (and the workers cannot see the driver's run directory).
    A snapshot read while the controller rewrites it can come back cut short: that read counts as none (0), and the
    caller, which polls, reads it again."""
    uri = f"s3://{cluster.bucket}/{prefix}/checkpoint_manager_snapshot.json"
    try:
        latest = json.loads(storage.read_bytes(uri)).get("latest_checkpoint_result") if storage.exists(uri) else None
    except json.JSONDecodeError:
        return 0
    return int(latest["metrics"]["step"]) if latest else 0


def _node_of_train_worker(cluster) -> str:
    """The name of the worker node that runs the live Ray Train worker: the node whose `ray start`
    process it descends from (through that node's raylet). Read from the processes, not Ray's State API, which a
    loaded machine leaves unanswered ("State API may be temporarily unavailable")."""
    import psutil

    node_of = {node.proc.pid: name for name, node in cluster.nodes.items()}
    found = []
    for p in psutil.process_iter(["cmdline"]):
        with contextlib.suppress(psutil.Error):
            if "RayTrainWorker" in " ".join(p.info["cmdline"] or ()) and p.status() != psutil.STATUS_ZOMBIE:
                node = next((node_of[a.pid] for a in p.parents() if a.pid in node_of), None)
                if node is not None:  # not a local Ray's Train worker (make test runs those beside this test)
                    found.append(node)
    # One node: a worker the run had before (its previous attempt, still exiting) may show beside it on a loaded
    # machine, but on the same node; workers on two nodes would leave the answer open.
    assert len(set(found)) == 1, found
    return found[0]


def test_a_worker_node_lost_mid_run_resumes_from_the_bucket_with_the_losses_of_a_run_not_interrupted_there(
    on_cluster, preempted, mlflow_server, monkeypatch
):
    """The preempted run's config again (`cglab train --name lost`); the node running the training worker is
    killed (its raylet and processes, SIGKILL; its scratch deleted) once Ray Train holds a checkpoint of a step
    later than the preempted run's stop: it restarts the worker on the other node, which resumes from that
    checkpoint in the bucket and finishes the run. Per step, every loss logged equals the preempted run's: up to
    this run's resume point that run had resumed and this one had not, after it the reverse, so each resume is
    checked against a run that went through that step uninterrupted. The node is started again afterwards."""
    from mlflow import MlflowClient

    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server.uri)
    stopped_at = preempted.resumed["started_at_step"]
    cfg_path = Path.cwd() / "mn.yaml"  # this test's driver directory
    cfg_path.write_text(preempted.cfg_yaml)
    killed: list[str] = []
    failed: list[BaseException] = []  # the killer's own error, for the assertion below (a thread's is otherwise lost)
    done = threading.Event()

    def kill_once_ray_train_holds_a_later_checkpoint():
        # `cglab train` runs in the main thread (it installs signal handlers); this one waits, then kills
        try:
            while _registered_step(on_cluster, "runs/lost") <= stopped_at:
                if done.wait(0.5):
                    return
            killed.append(_node_of_train_worker(on_cluster))
            on_cluster.kill_worker(killed[0])
        except BaseException as err:
            failed.append(err)
            raise

    killer = threading.Thread(target=kill_once_ray_train_holds_a_later_checkpoint, daemon=True)
    killer.start()
    try:
        result = _train(cfg_path, f"s3://{on_cluster.bucket}/runs", "lost")
        assert killed, f"the run ended before a node was killed; the killer raised {failed!r}"
        assert result["step"] == STEPS
        # the restarted worker, on the node left, resumed from a checkpoint in the bucket, later than the other's stop
        resumed_at = result["started_at_step"]
        assert stopped_at < resumed_at < STEPS and resumed_at % EVERY == 0
        assert killed[0] not in _alive_nodes()
    finally:
        done.set()
        killer.join(timeout=60)
        for name in killed:
            on_cluster.add_worker(name, 3)
    client = MlflowClient(mlflow_server.uri)
    lost = _losses(client, _mlflow_run(client, "lost"))
    assert sorted(lost) == sorted(preempted.losses) == list(range(1, STEPS + 1))
    for step, values in lost.items():
        assert values == pytest.approx([preempted.losses[step][0]] * len(values), abs=1e-5), step


def _alive_nodes() -> set[str]:
    import ray

    return {k for n in ray.nodes() if n["Alive"] for k in n["Resources"] if k.startswith("node_")}
