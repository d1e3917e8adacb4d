"""One training run as one Ray Train job: TP x PP x DP Megatron workers under TorchTrainer.

`fit(cfg, ...)` is what `cglab train`, `jobs/pretrain.py` and every Tune trial call.
"""

from __future__ import annotations

import contextlib
import functools
import json
import math
import os
from pathlib import Path

from cglab import storage
from cglab.config import CGLabConfig, dump_config
from cglab.raylocal import quiesce_at_exit, start_local
from cglab.track import timeline

RUNS = ".cglab/runs"  # the default storage of `cglab train` and jobs/pretrain.py
# Ray Train's controller sees a worker group finish (or fail) at its next poll of the workers: Ray's default of every
# 2 s leaves each run's start and end up to 2 s idle, seconds of every short trial of a sweep. A poll is one small
# call per worker; RAY_TRAIN_HEALTH_CHECK_INTERVAL_S set by the user wins.
HEALTH_CHECK_INTERVAL_S = "0.5"


def ensure_ray(cfg: CGLabConfig | None = None) -> None:
    """Connect to the running cluster (RAY_ADDRESS or one started with `ray start`), else start a local one
    bound to 127.0.0.1."""
    import ray  # heavy: only when a run starts

    quiesce_at_exit()
    if ray.is_initialized():
        return
    try:
        ray.init(address=os.environ.get("RAY_ADDRESS", "auto"), log_to_driver=True)
        return
    except ConnectionError:
        pass
    need = (cfg.world_size * cfg.parallel.cpus_per_worker if cfg else 1) + 2  # + Ray Data tasks
    if cfg is not None and cfg.eval.periodic:  # + the evaluation task's own CPUs (cglab.eval.periodic)
        need += math.ceil(cfg.eval.task_cpus)
    # Logical CPUs may exceed cores: Megatron workers mostly wait on each other, data tasks are light.
    start_local(max(os.cpu_count() or 1, need), dashboard_host="127.0.0.1", log_to_driver=True)


def run_paths(storage_path: str | None, name: str) -> tuple[str, Path]:
    """(the storage location Ray Train gets: a URI unchanged, a local path absolute; the run's directory on this
    machine for the files the driver writes: storage/name, or a local stand-in for a URI, `storage.local_dir`)."""
    where = storage.location(storage_path or RUNS)
    return where, storage.local_dir(storage.join(where, name))


def run_config(cfg: CGLabConfig, storage_path: str, name: str):
    """Ray Train's RunConfig of a run stored at `storage_path` (see `run_paths`)."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig  # Ray Train: only when a run starts

    return RunConfig(
        name=name,
        storage_path=storage_path,
        failure_config=FailureConfig(max_failures=cfg.train.max_failures),
        checkpoint_config=CheckpointConfig(num_to_keep=cfg.train.keep_last),
    )


def _exact(run_plan: dict) -> bool:
    """Whether the plan's data counts came from the prepared corpus's index (not a bounded scan's estimate)."""
    sources = (run_plan.get("data") or {}).get("sources") or []
    return all(e["method"].startswith("exact: the prepared corpus") for e in sources)


def _refuse_recorded(run_plan: dict, run_dir: Path, mlflow) -> None:
    """Write the plan beside the run (and to its MLflow run), then refuse it when it has errors."""
    from cglab.train.plan import refuse, write_json

    write_json(run_plan, run_dir / "plan.json")
    if mlflow is not None:
        _log_plan(mlflow, run_plan)
    refuse(run_plan)


def fit(
    cfg: CGLabConfig,
    *,
    storage_path: str | None = None,
    name: str = "cglab-train",
    mlflow=None,
    fault: dict | None = None,
    run_plan: dict | None = None,
    preemptible: bool = False,
    callbacks: tuple | list = (),
) -> dict:
    """Train; returns the last reported metrics plus `checkpoint` (path) and `run_dir`. `storage_path`: a local
    directory (default .cglab/runs) or an object-store URI, which Ray Train gets unchanged (`run_paths`).

    Bad configs and missing data fail here, on the driver, before any worker starts: `cglab.train.plan.plan_run` (or
    the `run_plan` a sweep made for this trial) is checked and the run refused on its errors; the plan is kept as
    run_dir/plan.json and the MLflow run's `plan.json`. Re-running with the same storage_path and name resumes
    from the latest complete checkpoint. `fault` is the test hook `cglab.train.callbacks.Fault` as a dict (step,
    marker, rank, mode).

    `preemptible` (`cglab train`): a SIGTERM to this driver or to any worker stops the run at the next step
    boundary with a complete checkpoint (cglab.train.preemption); the result then has `preempted` True and the
    same call resumes. Off for Tune trials: a trial that stopped early must not count as done, and a preempted
    sweep resumes with `Tuner.restore` from its trials' last checkpoints.

    `callbacks`: picklable factories of training callbacks from the layers above (the periodic evaluation,
    cglab.eval.periodic), called on every worker as factory(inputs, state, feed); train.loop._callbacks says
    where in the order they run.
    """
    timeline.begin("fit", "fit entry")
    # Ray Train, torch and Megatron (seconds to import): only when a run starts
    from cglab.data import artifacts
    from cglab.data.pipeline import prepare_data
    from cglab.train import preemption
    from cglab.train.callbacks import Fault
    from cglab.train.loop import WorkerInputs
    from cglab.train.plan import plan_run

    timeline.mark("fit imports done")
    storage_path, run_dir = run_paths(storage_path, name)
    cfg = artifacts.shared_cache(cfg, storage_path)  # the corpus where the nodes that prepare and read it reach it
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.yaml").write_text(dump_config(cfg))
    ensure_ray(cfg)
    timeline.mark("ray ensured")
    # refused before the corpus is prepared (hours on a real corpus) when the plan already says no; planned again
    # on the prepared corpus's exact counts when the first plan could only estimate them
    if run_plan is None:
        run_plan = plan_run(cfg)
    timeline.mark("plan done")
    if run_plan["errors"]:
        _refuse_recorded(run_plan, run_dir, mlflow)
    plan = prepare_data(cfg, run_dir)  # checks every source path and settles the tokenizer
    timeline.mark("data prepared")
    if not _exact(run_plan):
        run_plan = plan_run(cfg, tokenizer=plan.tokenizer())
    _refuse_recorded(run_plan, run_dir, mlflow)
    timeline.mark("plan logged")
    if run_plan.get("data"):  # passes per source: tokens read over what each source holds
        plan.tokens_available = tuple(float(e["tokens"]) for e in run_plan["data"]["sources"])
    stop_flag = preemption.stop_flag() if preemptible else None
    inputs = WorkerInputs(
        cfg=cfg,
        plan=plan,
        run_dir=str(run_dir),
        storage=storage.join(storage_path, name),
        mlflow=mlflow,
        name=name,
        fault=Fault(**fault) if fault else None,
        preemptible=preemptible,
        stop_flag=stop_flag,
        extra_callbacks=tuple(callbacks),
        eval_end_wait_s=worker_end_wait(run_plan),
    )
    trainer = torch_trainer(inputs, storage_path)
    with preemption.on_sigterm(stop_flag, cfg.train.preempt_grace_s) if preemptible else contextlib.nullcontext():
        timeline.mark("trainer.fit called")
        result = trainer.fit()
        timeline.mark("trainer.fit returned")
    out = dict(result.metrics or {})
    out["preempted"] = bool(out.get("preempted"))
    if mlflow is not None:
        _tag_passes(mlflow, out)
    # a URI for a URI storage: Ray's path has no scheme, and a bare `bucket/key` reads as a local path elsewhere
    out["checkpoint"] = storage.uri_of(result.checkpoint.path, storage_path) if result.checkpoint else None
    out["run_dir"] = str(run_dir)
    out["tokenizer"] = str(run_dir / "tokenizer")
    out["timeline"] = timeline.hand_back(out.get("timeline"))  # the workers' events (last report) and this one's
    return out


def torch_trainer(inputs, storage_path: str):
    """The run's TorchTrainer: `inputs` (train.loop.WorkerInputs) on cfg.world_size workers, stored at
    storage_path/inputs.name (see `run_paths`)."""
    from ray.train import ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from cglab.train import preemption
    from cglab.train.loop import worker_loop

    cfg = inputs.cfg
    p, t = cfg.parallel, cfg.train
    os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", HEALTH_CHECK_INTERVAL_S)  # read by TorchTrainer.fit
    backend = "nccl" if p.use_gpu else "gloo"
    return TorchTrainer(
        # bound to the train function, not passed as train_loop_config: Ray Train's controller unpickles that (and
        # would import torch, Megatron and cglab's training modules, seconds per run, in a process that never
        # trains), while the train function is unpickled only where it runs, on the workers
        functools.partial(worker_loop, inputs),
        scaling_config=ScalingConfig(
            num_workers=cfg.world_size, use_gpu=p.use_gpu, resources_per_worker={"CPU": p.cpus_per_worker}
        ),
        torch_config=(
            preemption.PreemptibleTorchConfig(backend=backend, timeout_s=600, grace_s=t.preempt_grace_s)
            if inputs.preemptible
            else TorchConfig(backend=backend, timeout_s=600)
        ),
        run_config=run_config(cfg, storage_path, inputs.name),
    )


def worker_end_wait(run_plan: dict) -> float | None:
    """The end wait every worker's periodic evaluation gets: the plan's bound (None: no evaluation while training)."""
    return run_plan["periodic_eval"].get("end_wait_s")


def _log_plan(ctx, run_plan: dict) -> None:
    from mlflow import MlflowClient  # seconds to import: only when tracking

    client = MlflowClient(ctx.tracking_uri)
    client.log_dict(ctx.run_id, run_plan, "plan.json")
    client.set_tag(ctx.run_id, "model.init_from", run_plan.get("init_from", {}).get("weights", "random init"))


def _tag_passes(ctx, metrics: dict) -> None:
    """Run tags `data.passes` (passes over each source, e.g. `pile=0.004021,stack=0.0132`) and `data.epochs`."""
    from mlflow import MlflowClient  # seconds to import: only when tracking

    passes = {k.removeprefix("data/passes/"): v for k, v in metrics.items() if k.startswith("data/passes/")}
    client = MlflowClient(ctx.tracking_uri)
    if passes:
        client.set_tag(ctx.run_id, "data.passes", ",".join(f"{k}={v:.4g}" for k, v in sorted(passes.items())))
    if "epoch" in metrics:
        client.set_tag(ctx.run_id, "data.epochs", str(int(metrics["epoch"]) + 1))


def history(run_dir: str | Path) -> dict[int, dict]:
    """Per-step metrics a run recorded in run_dir/metrics.jsonl; a step re-run after a failure keeps its last record."""
    return records_by_step(Path(run_dir) / "metrics.jsonl")


def records_by_step(path: str | Path) -> dict[int, dict]:
    """A JSON-lines record of a run (one object with a "step" per line) by step; a step written twice keeps its last
    record (a step re-run after a failure, an evaluation repeated after a restart). {} when the file is absent."""
    steps: dict[int, dict] = {}
    path = Path(path)
    if path.is_file():
        for line in path.read_text().splitlines():
            rec = json.loads(line)
            steps[int(rec["step"])] = rec
    return steps
