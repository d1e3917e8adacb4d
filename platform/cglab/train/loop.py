"""The training worker: what every Ray Train worker runs, top to bottom.

    parallel state -> model/optimizer -> resume -> [feed -> forward/backward + optimizer step -> callbacks]*

The loop is fixed; everything around a step (throughput and MFU, checkpoints, the metric sinks, stopping on
preemption, fault injection for tests) is a callback (train/callbacks.py), in the order `_callbacks` sets; a
callback ends the loop early by setting `StepEnd.stop`. The data each step trains on comes from the feed
(train/feed.py): identical on every model-parallel peer, its position part of the checkpoint.
"""

from __future__ import annotations

import contextlib
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import ray.train
import torch
import torch.distributed as dist

from cglab.config import CGLabConfig
from cglab.data.pipeline import DataPlan
from cglab.distributed import init_parallel
from cglab.track import timeline
from cglab.track.mlflow_logger import MlflowContext
from cglab.train import callbacks as cb
from cglab.train import checkpoint
from cglab.train.checkpoint import DataPosition
from cglab.train.feed import DataFeed
from cglab.train.step import TrainState, build_train_state, train_step

log = logging.getLogger(__name__)
IMPORTED_AT = time.time()  # this worker's imports (torch, Megatron, Ray Train) finished: cglab.track.timeline


@dataclass(frozen=True)
class WorkerInputs:
    """What every worker of one run gets (train.trainer.fit builds it; Ray Train pickles it to each worker)."""

    cfg: CGLabConfig
    plan: DataPlan  # the data stream and the tokenizer (data/pipeline.py)
    run_dir: str | None = None  # checkpoints to resume from and metrics.jsonl, when the worker can see it
    # the run's storage location (<storage_path>/<name>: a URI or a local path), which every node reaches
    storage: str = ""
    mlflow: MlflowContext | None = None  # the MLflow run to log into
    name: str = ""  # the run's (trial's) name, a Prometheus tag
    fault: cb.Fault | None = None  # test hook: fail once at a step
    # SIGTERM stops the run at a step boundary with a checkpoint (train/preemption.py); the driver's flag, when set
    preemptible: bool = False
    stop_flag: Any = None  # train.preemption.StopFlag actor handle
    # Callbacks from the layers above train (e.g. cglab.eval.periodic): picklable factories, each called on every
    # worker as factory(inp, state, feed) -> Callback; `_callbacks` says where they run
    extra_callbacks: tuple[Callable[..., cb.Callback], ...] = ()
    # how long the end of a completed run waits for the evaluation in flight: the plan's bound (periodic_eval)
    eval_end_wait_s: float | None = None


def worker_loop(inp: WorkerInputs) -> None:
    """One Ray Train worker of the run: resume, then feed, step and callbacks until train.train_steps or, with
    train.stop_at=raw_tokens / loss_tokens, until train.token_budget of them (DataFeed.done)."""
    timeline.begin("worker", "worker_loop entry", imported_at=IMPORTED_AT)
    cfg, t, p = inp.cfg, inp.cfg.train, inp.cfg.parallel
    init_parallel(
        p.tensor_model_parallel_size,
        p.pipeline_model_parallel_size,
        seed=t.seed,
        device=ray.train.torch.get_device().index if p.use_gpu else None,
    )
    timeline.mark("parallel state ready")
    state = build_train_state(cfg, lr_decay_steps=t.train_steps)  # decay over the whole budget (lesson 5)
    timeline.mark("model built")
    step, pos, resumed_from = _resume(state, inp.run_dir)
    feed = DataFeed(cfg, inp.plan, pos)
    callbacks = _callbacks(inp, state, feed)
    timeline.mark("resumed, feed and callbacks ready")
    start = step
    try:
        callbacks.start(step, resumed_from)
        while not feed.done(step):
            t0 = time.perf_counter()
            micro = feed.next_step()
            t1 = time.perf_counter()
            out = train_step(state, cfg, micro, lr_progress=feed.progress)
            if torch.cuda.is_available():
                torch.cuda.synchronize()  # the step's time is the device's, not the launch's
            t2 = time.perf_counter()
            step += 1
            timeline.steps(step, start + 1, last=feed.done(step))
            metrics = {**out, "step": step, "epoch": feed.pos.epoch, "started_at_step": start, **feed.step_stats}
            s = cb.StepEnd(step, metrics, data_wait_s=t1 - t0, step_time_s=t2 - t0, last=feed.done(step))
            callbacks.step_end(s)
            if s.stop:
                log.warning("preempted: stopped at step %d with a checkpoint; the same command resumes", step)
                break
    finally:
        callbacks.end()


def _resume(state: TrainState, run_dir: str | None) -> tuple[int, DataPosition, str | None]:
    """Load the newest complete checkpoint, from Ray Train's or the run directory's (a worker killed right after
    reporting can leave one Ray does not hand back); (0, start of the data, None) when there is none."""
    ckpt = ray.train.get_checkpoint()
    with ckpt.as_directory() if ckpt is not None else contextlib.nullcontext() as d:
        good = checkpoint.newest_complete(d, run_dir)
        if good is None:
            return 0, DataPosition(), None
        step, pos = checkpoint.load(good, state)
        return step, pos, good


def _callbacks(inp: WorkerInputs, state: TrainState, feed: DataFeed) -> cb.Callbacks:
    """In order: fault injection first (a failing step neither checkpoints nor reports), preemption (it decides
    whether this step checkpoints), the step's metrics, the checkpoint (its time is a metric), the extra
    callbacks (`WorkerInputs.extra_callbacks`, in their order: after the checkpoint, before the sinks, so what
    they add to a step's metrics is logged with it), then the sinks; the Ray Train report, which takes the
    checkpoint, last."""
    cfg, rank = inp.cfg, dist.get_rank()
    run_dir = Path(inp.run_dir) if inp.run_dir else None
    return cb.Callbacks(
        [
            *([cb.FaultInjection(inp.fault)] if inp.fault else []),
            *([cb.Preemption(cfg, inp.stop_flag, rank)] if inp.preemptible else []),
            cb.Throughput(cfg),
            cb.Checkpointer(cfg, state, feed, inp.plan.tokenizer_json),
            *(make(inp, state, feed) for make in inp.extra_callbacks),
            cb.MlflowMetrics(inp.mlflow, rank),
            *(
                [cb.History(run_dir / "metrics.jsonl")]
                if rank == 0 and run_dir is not None and run_dir.is_dir()
                else []
            ),
            cb.Prometheus(cfg, inp.name, rank),
            cb.RayReport(cfg.train.log_every),
        ]
    )
