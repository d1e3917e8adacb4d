"""`cglab train CONFIG [key=value ...]`: one training run on the current Ray cluster (or a local one)."""
from __future__ import annotations

import argparse
import json
import os


def register(subparsers) -> None:
    p = subparsers.add_parser("train", help="train a CodeGen model (Megatron-Core under Ray Train)")
    p.add_argument("config", help="YAML under jobs/configs/ (or any path)")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.lr=3e-4")
    p.add_argument("--storage", default=None, help="Ray Train storage path (default .cglab/runs)")
    p.add_argument("--name", default=None, help="run name; the same name resumes from its last checkpoint")
    p.set_defaults(func=run)


def mlflow_run(cfg, name: str):
    """Create (or find again, by name) this run in MLflow from the driver; None when tracking is off."""
    uri = cfg.track.mlflow_uri or os.environ.get("MLFLOW_TRACKING_URI")
    if not uri:
        return None
    from mlflow import MlflowClient
    from mlflow.entities import Param

    from cglab.config import dump_config, flatten
    from cglab.track.mlflow_logger import MlflowContext, SweepTracker, _param_value

    tracker = SweepTracker(uri, cfg.track.experiment, sweep=name, system_metrics=cfg.track.system_metrics)
    exp_id = tracker.ensure_experiment()
    client = MlflowClient(uri)
    found = client.search_runs([exp_id], filter_string=f"tags.`cglab.run` = '{name}'", max_results=1)
    if found:
        rid = found[0].info.run_id
    else:
        rid = client.create_run(exp_id, run_name=name, tags={"cglab.run": name, **cfg.track.tags}).info.run_id
        params = [Param(k, _param_value(v)) for k, v in flatten(cfg).items()]
        for i in range(0, len(params), 100):
            client.log_batch(rid, params=params[i:i + 100])
        client.log_text(rid, dump_config(cfg), "config.yaml")
    return MlflowContext(tracking_uri=uri, run_id=rid, experiment_id=exp_id, system_metrics=cfg.track.system_metrics)


def run(args: argparse.Namespace) -> int:
    from cglab.config import load_config
    from cglab.train.trainer import fit

    cfg = load_config(args.config, args.overrides)
    name = args.name or cfg.track.run_name or os.path.splitext(os.path.basename(args.config))[0]
    ctx = mlflow_run(cfg, name)
    out = fit(cfg, storage_path=args.storage, name=name, mlflow=ctx)
    if ctx is not None:
        from mlflow import MlflowClient

        MlflowClient(ctx.tracking_uri).set_terminated(ctx.run_id, "FINISHED")
    print(json.dumps(out, indent=1, default=str))
    return 0
