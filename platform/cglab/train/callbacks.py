"""Everything around a training step, as callbacks: the loop (train/loop.py) only resumes, feeds and steps.

Each callback is one concern and overrides the hooks it needs; `Callbacks` calls every hook on every callback in
the list's order (train/loop.py sets that order once):

    on_start(step, resumed_from)  once, after the resume (step: where this attempt starts)
    on_step_end(s)                after each step: add to s.metrics, save a checkpoint (s.checkpoint), or stop
                                  the loop after this step (s.stop; the Checkpointer then saves it)
    on_checkpoint(s)              then, when the step saved a checkpoint
    on_log(s)                     then: the step's metrics are final, send them somewhere
    on_end()                      always, also when a step raised (the loop calls it from `finally`)

Models: OLMo-core's Trainer callbacks (speed monitor, checkpointer, metric sinks), torchtitan's Trainer.train().
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import ray
import ray.train
import torch
import torch.distributed as dist

from cglab.config import CGLabConfig
from cglab.track import timeline
from cglab.track.metrics import TrainMetrics
from cglab.track.mlflow_logger import MlflowContext, RankZeroLogger
from cglab.train import checkpoint, checkpoint_writes, preemption
from cglab.train.feed import DataFeed
from cglab.train.flops import device_peak_tflops, flops_per_token, mfu


@dataclass
class StepEnd:
    """One finished global step, as the callbacks see it and add to."""

    step: int  # steps done, this one included
    metrics: dict[str, float]  # what the sinks log; callbacks add their own
    data_wait_s: float  # waiting for the feed
    step_time_s: float  # feed + forward/backward + optimizer step
    checkpoint: Path | None = None  # this rank's staged checkpoint, when the step saved one
    stop: bool = False  # the loop ends after this step (set on every rank alike: the Preemption callback)
    last: bool = False  # the run is complete with this step (train.train_steps or train.token_budget reached)


CHECKPOINT_FLUSH_S = 30.0  # MlflowMetrics: the most a checkpoint step waits for its metrics to reach MLflow


class Callback:
    """A no-op for every hook; a callback overrides the ones it needs."""

    def on_start(self, step: int, resumed_from: str | None) -> None:
        pass

    def on_step_end(self, s: StepEnd) -> None:
        pass

    def on_checkpoint(self, s: StepEnd) -> None:
        pass

    def on_log(self, s: StepEnd) -> None:
        pass

    def on_end(self) -> None:
        pass


class Callbacks:
    """The run's callbacks; each hook runs on all of them, in order."""

    def __init__(self, items: list[Callback]):
        self.items = items

    def start(self, step: int, resumed_from: str | None) -> None:
        for cb in self.items:
            cb.on_start(step, resumed_from)

    def step_end(self, s: StepEnd) -> None:
        for cb in self.items:
            cb.on_step_end(s)
        if s.checkpoint is not None:
            for cb in self.items:
                cb.on_checkpoint(s)
        for cb in self.items:
            cb.on_log(s)

    def end(self) -> None:
        # Every on_end runs even when one raises (the first error is raised after the rest ran).
        with contextlib.ExitStack() as stack:
            for cb in reversed(self.items):
                stack.callback(cb.on_end)


# ---------------------------------------------------------------------------------------------- step events
@dataclass(frozen=True)
class Fault:
    """Test hook: at `step`, kill rank `rank`'s worker process (mode "kill") or raise in it (mode "raise"), once:
    the marker file it leaves stops the restarted worker from failing again."""

    step: int
    marker: str
    rank: int = 0
    mode: Literal["kill", "raise"] = "kill"


class FaultInjection(Callback):
    """Fails the worker as `Fault` says, to exercise failure recovery; first in the list, so the failing step
    neither checkpoints nor reports."""

    def __init__(self, fault: Fault):
        self.fault = fault

    def on_step_end(self, s: StepEnd) -> None:
        f = self.fault
        if s.step != f.step or dist.get_rank() != f.rank:
            return
        marker = Path(f.marker)
        if marker.exists():
            return
        marker.write_text(str(s.step))
        if f.mode == "raise":
            raise RuntimeError(f"injected failure at step {s.step}")
        os.kill(os.getpid(), signal.SIGKILL)


class Preemption(Callback):
    """Stops the run at this step when any worker got SIGTERM or the driver did (its StopFlag, read by rank 0):
    one all-reduce of the flag per step, so every TP/PP/DP peer stops at the same step; the Checkpointer then saves
    it and the metric `preempted` tells the driver (train/preemption.py)."""

    def __init__(self, cfg: CGLabConfig, stop_flag, rank: int):
        self.stop_flag, self.rank = stop_flag, rank
        self.device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else None

    def on_step_end(self, s: StepEnd) -> None:
        asked = preemption.worker_signalled()
        if self.rank == 0 and self.stop_flag is not None and not asked:
            asked = ray.get(self.stop_flag.is_set.remote())
        flag = torch.tensor([float(asked)], device=self.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        if flag.item() > 0 and not s.last:  # at the last step the run is complete anyway
            s.stop = True
            s.metrics["preempted"] = 1.0

    def on_end(self) -> None:
        preemption.disarm()


class Throughput(Callback):
    """tokens_seen, data_wait_s, step_time_s, tokens_per_s (global) and, on a device whose peak is known, tflops
    and mfu per device (cglab.train.flops: model FLOPs per token over the datasheet peak)."""

    def __init__(self, cfg: CGLabConfig):
        self.model, self.seq = cfg.model, cfg.data.seq_length
        self.tokens_per_step = cfg.train.global_batch_size * self.seq
        self.flops_per_token = flops_per_token(cfg.model, self.seq)
        self.peak = device_peak_tflops()
        self.world = dist.get_world_size()

    def on_step_end(self, s: StepEnd) -> None:
        m = s.metrics
        m.update(
            tokens_seen=s.step * self.tokens_per_step,
            data_wait_s=s.data_wait_s,
            step_time_s=s.step_time_s,
            tokens_per_s=self.tokens_per_step / s.step_time_s,
        )
        if self.peak is not None:
            m["tflops"] = m["tokens_per_s"] * self.flops_per_token / 1e12 / self.world
            m["mfu"] = mfu(m["tokens_per_s"], self.model, self.seq, self.world, self.peak)


class Checkpointer(Callback):
    """Every train.checkpoint_every steps, at the last one and where the loop stops early (s.stop), saves model,
    optimizer, scheduler, RNG and the feed's data position (train/checkpoint.py) into a staging directory, with
    the config and the tokenizer, and times what the step waited for it (`checkpoint_s`). A checkpoint is handed
    on (`s.checkpoint`, which RayReport gives Ray Train) only once it is COMPLETE.

    With train.async_save (train/checkpoint_writes.py) a checkpoint is written while training goes on, so it is
    reported at a later step: the first step boundary where every rank's write has ended, with that step's metrics
    and `checkpoint_step`, the step it holds. Reporting at the step it was started would hand Ray Train a directory
    still being written, which Ray copies to storage at once; waiting for the write at that step would make it
    synchronous. The last step and a preemption's stop (s.stop) wait for their own write before the loop ends, so
    a stopped run resumes from the step it stopped at. on_end (also when a step raised) kills a write still in
    flight, which never becomes COMPLETE, and removes the staging directory."""

    def __init__(self, cfg: CGLabConfig, state, feed: DataFeed, tokenizer_json: str):
        self.cfg, self.state, self.feed, self.tokenizer_json = cfg, state, feed, tokenizer_json
        self.staging = Path(tempfile.mkdtemp(prefix="cglab-ckpt-"))
        self._writes: checkpoint_writes.Writes | None = None

    @property
    def writes(self) -> checkpoint_writes.Writes:
        if self._writes is None:  # at the first checkpoint: the run's decisions live on its TrainState
            self._writes = checkpoint_writes.Writes(background=self.state.decisions.async_save)
        return self._writes

    def on_step_end(self, s: StepEnd) -> None:
        t = self.cfg.train
        last = s.last or s.stop  # the run's last step (train.train_steps, or a token budget's) or a stop
        due = last or (t.checkpoint_every and s.step % t.checkpoint_every == 0)
        if not due and not (self._writes and self._writes.in_flight):
            return
        c0 = time.perf_counter()
        if due:
            d = checkpoint.local_dir(self.staging, s.step)
            extra = {"config": self.cfg.model_dump(mode="json")}
            files = {"tokenizer/tokenizer.json": self.tokenizer_json}
            request = checkpoint.request(d, self.state, s.step, self.feed.pos, extra, files)
            self.writes.start(request, checkpoint_writes.Write(d, s.step))
        self.writes.finalize(blocking=last)  # last: the run ends (or stops) with its checkpoint COMPLETE
        *superseded, newest = self.writes.take() or [None]
        for old in superseded:  # sealed at the same boundary as a newer one: the newer is reported
            shutil.rmtree(old.directory, ignore_errors=True)
        s.metrics["checkpoint_s"] = time.perf_counter() - c0
        if newest is not None:
            s.checkpoint = newest.directory
            s.metrics["checkpoint_step"] = newest.step

    def on_end(self) -> None:
        if self._writes is not None:
            self._writes.abort()
        shutil.rmtree(self.staging, ignore_errors=True)


# ---------------------------------------------------------------------------------------------- metric sinks
class MlflowMetrics(Callback):
    """Every step's metrics into the run's MLflow run (rank 0; RankZeroLogger never blocks training), plus
    `resumed_at_step` when this attempt resumed; the logger is flushed and closed at the end.

    At a step that hands on a checkpoint the logger is flushed before RayReport (last) registers it: a worker lost
    after that resumes past those steps and never logs them again, so they must be in MLflow by then (one send
    attempt, at most CHECKPOINT_FLUSH_S; a server that is down fails it at once and its backlog is kept). Found on
    the multi-node bed: a node killed after a checkpoint at step 8 took step 8's loss, still queued, with it."""

    def __init__(self, ctx: MlflowContext | None, rank: int):
        self.rank = rank
        self.logger = RankZeroLogger.from_context(ctx, rank=rank)

    def on_start(self, step: int, resumed_from: str | None) -> None:
        if resumed_from and self.rank == 0:
            self.logger.log_metrics(step, {"resumed_at_step": step})

    def on_log(self, s: StepEnd) -> None:
        self.logger.log_metrics(s.step, s.metrics)
        if s.checkpoint is not None:
            self.logger.flush(CHECKPOINT_FLUSH_S)

    def on_end(self) -> None:
        self.logger.close()


class History(Callback):
    """A local record of every step: one JSON line per step in run_dir/metrics.jsonl (train.trainer.history reads
    it; a step re-run after a failure is appended again)."""

    def __init__(self, path: Path):
        self.path = path

    def on_log(self, s: StepEnd) -> None:
        with self.path.open("a") as f:
            f.write(json.dumps(s.metrics) + "\n")


class Prometheus(Callback):
    """Each step's metrics and checkpoint time as Prometheus metrics (cglab.track.metrics), tagged with the
    experiment, trial and rank."""

    def __init__(self, cfg: CGLabConfig, trial: str, rank: int):
        self.prom = TrainMetrics(experiment=cfg.track.experiment, trial=trial, rank=rank)
        self.tokens_per_step = cfg.train.global_batch_size * cfg.data.seq_length

    def on_checkpoint(self, s: StepEnd) -> None:
        self.prom.checkpoint(s.metrics["checkpoint_s"])

    def on_log(self, s: StepEnd) -> None:
        self.prom.report({**s.metrics, "tokens": self.tokens_per_step})


class RayReport(Callback):
    """`ray.train.report`: with the checkpoint at each checkpoint step (Ray persists it, so the staged copy is
    deleted), else every train.log_every steps. Last in the list: it deletes the staged checkpoint, and what it
    reports is the step's final record."""

    def __init__(self, log_every: int):
        self.log_every = log_every

    def on_log(self, s: StepEnd) -> None:
        if s.checkpoint is not None:
            timeline.mark("checkpoint report called")
            ray.train.report(self._with_timeline(s), checkpoint=ray.train.Checkpoint.from_directory(str(s.checkpoint)))
            shutil.rmtree(s.checkpoint, ignore_errors=True)
        elif s.step % self.log_every == 0:
            ray.train.report(self._with_timeline(s))

    @staticmethod
    def _with_timeline(s: StepEnd) -> dict:
        # this worker's events so far ride in every report: the last one is what `fit` returns (cglab.track.timeline)
        return {**s.metrics, "timeline": timeline.snapshot()}
