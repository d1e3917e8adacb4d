"""`cglab train CONFIG [key=value ...]`: one training run on the current Ray cluster (or a local one).

A top-level command (above eval and tune) because it wires the evaluation while training into the run:
with eval.code_every set, pass@1 on a fixed HumanEval / HumanEval-Infill subset; with eval.every set, the
held-out text metrics on the held-out split a lesson sweep uses (`cglab.data.heldout`: sampled from the prepared
corpus with data.seed, kept under data.cache_path beside it and skipped by the training stream; the run is tagged
eval.texts / eval.heldout). See `cglab.eval.periodic`.
"""

from __future__ import annotations

import argparse
import json
import os

from cglab.config import CGLabConfig, dump_config, flatten, from_dict, load_config
from cglab.track.mlflow_logger import MlflowContext, SweepTracker


def register(subparsers) -> None:
    p = subparsers.add_parser("train", help="train a CodeGen model (Megatron-Core under Ray Train)")
    p.add_argument("config", help="YAML under jobs/configs/ (or any path)")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.lr=3e-4")
    p.add_argument(
        "--storage", default=None, help="Ray Train storage: a local directory (default .cglab/runs) or a URI (s3://...)"
    )
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


def periodic_eval(cfg: CGLabConfig, storage_path: str) -> tuple[CGLabConfig, tuple, dict[str, str]]:
    """(config to train, fit's callbacks, eval tags) for eval.every / eval.code_every: with eval.every,
    eval.holdout set and the held-out split's texts (cglab.data.heldout: sampled with eval.heldout_seed from the
    prepared corpus, so the same command resumes on the same split; `fit` reuses the corpus prepared here, in the
    run's storage when that is a URI: `artifacts.shared_cache`, so the evaluation reads the texts on any node)."""
    from cglab.data import artifacts
    from cglab.data.pipeline import prepare_data
    from cglab.eval.periodic import PeriodicEval
    from cglab.tune.evaluate import text_sources, text_tags

    if not cfg.eval.periodic:
        return cfg, (), {}
    if cfg.eval.every:
        cfg = artifacts.shared_cache(from_dict(cfg.model_dump(mode="json"), ["eval.holdout=true"]), storage_path)
        held = prepare_data(cfg).artifacts["heldout"]
        nl, code = held["texts"]["nl"], held["texts"]["code"]
        why = f"documents held out per kind: nl {held['nl']['documents']}, code {held['code']['documents']}"
        used = text_sources(nl, code, cfg.eval.allow_builtin_texts, why)  # ConfigError naming the field
        return cfg, (PeriodicEval(nl, code),), text_tags(used)
    return cfg, (PeriodicEval(),), {}


def run(args: argparse.Namespace) -> int:
    """Exit 0 when the run finished; EXIT_PREEMPTED (75) when a SIGTERM stopped it with a checkpoint: the MLflow
    run is then KILLED (it did not reach train.train_steps, and status FINISHED is what filters for complete runs
    select) with the tags `preempted=true` and `preempted_at_step`, and the same command resumes it."""
    # Ray and Megatron: kept off `cglab --help`
    from cglab.train.preemption import EXIT_PREEMPTED
    from cglab.train.trainer import fit, run_paths

    cfg = load_config(args.config, args.overrides)
    name = args.name or cfg.track.run_name or os.path.splitext(os.path.basename(args.config))[0]
    cfg, callbacks, tags = periodic_eval(cfg, run_paths(args.storage, name)[0])
    ctx = mlflow_run(cfg, name)
    if ctx is not None and tags:  # which texts the eval.every curves are scored on
        client = SweepTracker(ctx.tracking_uri, cfg.track.experiment, sweep=name).client
        for k, v in tags.items():
            client.set_tag(ctx.run_id, k, v)
    out = fit(cfg, storage_path=args.storage, name=name, mlflow=ctx, preemptible=True, callbacks=callbacks)
    step = int(out.get("step", 0))
    if ctx is not None:
        tracker = SweepTracker(ctx.tracking_uri, cfg.track.experiment, sweep=name)
        if out["preempted"]:
            tracker.finish_run(ctx.run_id, status="KILLED", tags={"preempted": "true", "preempted_at_step": step})
        else:
            tracker.finish_run(ctx.run_id, status="FINISHED", tags={"preempted": "false"})
    out.pop("timeline", None)  # where the run's time went: for benchmarks/trial_overhead.py, not this summary
    print(json.dumps(out, indent=1, default=str))
    if out["preempted"]:
        print(f"cglab train: preempted at step {step}, checkpoint saved; run the same command to resume", flush=True)
        return EXIT_PREEMPTED
    return 0
