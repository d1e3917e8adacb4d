"""`cglab train CONFIG [key=value ...]`: one training run on the current Ray cluster (or a local one)."""

from __future__ import annotations

import argparse
import json
import os

from cglab.config import CGLabConfig, dump_config, flatten, load_config
from cglab.track.mlflow_logger import MlflowContext, SweepTracker


def register(subparsers) -> None:
    p = subparsers.add_parser("train", help="train a CodeGen model (Megatron-Core under Ray Train)")
    p.add_argument("config", help="YAML under jobs/configs/ (or any path)")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.lr=3e-4")
    p.add_argument("--storage", default=None, help="Ray Train storage path (default .cglab/runs)")
    p.add_argument("--name", default=None, help="run name; the same name resumes from its last checkpoint")
    p.set_defaults(func=run)


def mlflow_run(cfg: CGLabConfig, name: str) -> MlflowContext | None:
    """Create (or find again, by name) this run in MLflow from the driver; None when tracking is off. A run found
    again (resumed after a preemption) is RUNNING again."""
    uri = cfg.track.mlflow_uri or os.environ.get("MLFLOW_TRACKING_URI")
    if not uri:
        return None
    tracker = SweepTracker(uri, cfg.track.experiment, sweep=name, system_metrics=cfg.track.system_metrics)
    rid = tracker.named_run(name, tags=cfg.track.tags, params=flatten(cfg), config_yaml=dump_config(cfg))
    tracker.client.update_run(rid, status="RUNNING")
    return tracker.context(rid)


def run(args: argparse.Namespace) -> int:
    """Exit 0 when the run finished; EXIT_PREEMPTED (75) when a SIGTERM stopped it with a checkpoint: the MLflow
    run is then KILLED (it did not reach train.train_steps, and status FINISHED is what filters for complete runs
    select) with the tags `preempted=true` and `preempted_at_step`, and the same command resumes it."""
    # Ray and Megatron: kept off `cglab --help`
    from cglab.train.preemption import EXIT_PREEMPTED
    from cglab.train.trainer import fit

    cfg = load_config(args.config, args.overrides)
    name = args.name or cfg.track.run_name or os.path.splitext(os.path.basename(args.config))[0]
    ctx = mlflow_run(cfg, name)
    out = fit(cfg, storage_path=args.storage, name=name, mlflow=ctx, preemptible=True)
    step = int(out.get("step", 0))
    if ctx is not None:
        tracker = SweepTracker(ctx.tracking_uri, cfg.track.experiment, sweep=name)
        if out["preempted"]:
            tracker.finish_run(ctx.run_id, status="KILLED", tags={"preempted": "true", "preempted_at_step": step})
        else:
            tracker.finish_run(ctx.run_id, status="FINISHED", tags={"preempted": "false"})
    print(json.dumps(out, indent=1, default=str))
    if out["preempted"]:
        print(f"cglab train: preempted at step {step}, checkpoint saved; run the same command to resume", flush=True)
        return EXIT_PREEMPTED
    return 0
