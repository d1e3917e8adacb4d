"""The training worker: what every Ray Train worker runs, top to bottom.

    parallel state -> model/optimizer -> resume -> [read step's batches -> forward/backward -> step -> report]*

Data: one rank per model-parallel group (TP x PP peers share a data-parallel rank) reads its DP shard (its own
units of work, data/pipeline.py) from the Ray Data pipeline and broadcasts the step's micro-batches to its peers,
so peers see identical batches at no extra read. The data position (epoch, samples used, and each DP rank's
(unit, offset)) lives in the checkpoint; on resume each rank rebuilds its stream from its own unit, skipping the
units before it unread (Ray Data iterators cannot resume mid-epoch; `streaming_split` would give TP peers
different data).
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import signal
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from cglab.config import CGLabConfig
from cglab.train import checkpoint
from cglab.train.checkpoint import DataPosition
from cglab.train.step import OBJECTIVES

_INT_KEYS = ("tokens", "labels", "segment_ids", "prefix_end")  # per token: (n, b, s)
_ROW_KEYS = ("objective",)  # per sample: (n, b)


class DataFeed:
    """The micro-batches of each global step, identical on every model-parallel peer.

    An epoch is `ceil(train.train_steps / train.epochs)` global batches of the stream; the next epoch starts only
    when that budget is used (lesson 5). A stream that runs dry before it is an error with the numbers, never a
    silent extra pass over the data. DP ranks hold different numbers of samples (whole units each): every step
    takes the same number from every rank, so an epoch can last only as long as the shortest shard, and what the
    longer shards hold beyond it is not trained on in that epoch (the budget error names the numbers). Each step
    also records every rank's (unit, offset) in the position, and adds up, over every data-parallel shard, the masked fraction
    per objective and the tokens read from each source (DataPosition.source_tokens: passes per source).
    """

    def __init__(self, cfg: CGLabConfig, plan, pos: DataPosition):
        from megatron.core import parallel_state as ps

        self.cfg, self.plan = cfg, plan
        t = cfg.train
        self.dp_rank, self.dp_size = ps.get_data_parallel_rank(), ps.get_data_parallel_world_size()
        self.mb, self.global_batch = t.micro_batch_size, t.global_batch_size
        self.n_micro = t.global_batch_size // (t.micro_batch_size * self.dp_size)
        self.group = ps.get_model_parallel_group()
        self.src = dist.get_process_group_ranks(self.group)[0]
        self.reader = dist.get_rank() == self.src
        self.per_epoch = math.ceil(t.train_steps / t.epochs) * t.global_batch_size
        self.n_sources = len(plan.sources)
        tokens = tuple(pos.source_tokens) or (0,) * self.n_sources
        if pos.index and not pos.shards:
            raise RuntimeError(f"data: the checkpoint's data position (epoch {pos.epoch}, sample {pos.index}) has "
                               f"no per-rank positions (written before sharded reading); restart the epoch "
                               f"from a new run")
        if pos.shards and pos.dp_size != self.dp_size:
            from cglab.config import ConfigError

            raise ConfigError(f"parallel.data_parallel_size: the checkpoint was written with "
                              f"data_parallel_size={pos.dp_size}, this run has {self.dp_size}; each rank's data "
                              f"position is a place in its own units of work, which are assigned per DP size, so "
                              f"it cannot be remapped: resume with data_parallel_size={pos.dp_size}")
        self.pos = DataPosition(pos.epoch, pos.index, tokens, pos.dp_size, tuple(pos.shards))
        self.step_stats: dict[str, float] = {}
        self._it = None
        self.device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else "cpu"

    def _fetch(self) -> list[dict] | None:
        if self._it is None:
            from cglab.data.pipeline import iter_train_batches

            start = self.pos.shards[self.dp_rank] if self.pos.shards else (0, 0)
            self._it = iter_train_batches(self.cfg, self.pos.epoch, self.dp_rank, self.dp_size, start,
                                          self.mb, self.plan)
        micro = []
        for _ in range(self.n_micro):
            b = next(self._it, None)
            if b is None:
                return None
            micro.append(b)
        return micro

    def next_step(self) -> list[dict]:
        if self.pos.index + self.global_batch > self.per_epoch:  # this epoch's share of the budget is used
            if self.pos.epoch + 1 >= self.cfg.train.epochs:
                raise RuntimeError(f"data: all train.epochs={self.cfg.train.epochs} epochs of "
                                   f"{self.per_epoch} samples are used; train.train_steps asks for more")
            self.pos, self._it = DataPosition(self.pos.epoch + 1, 0, self.pos.source_tokens), None
        micro = self._fetch() if self.reader else []
        stats = self._stats(micro)
        dist.all_reduce(stats)  # sums: every shard's counts, and whether any shard ran dry
        if stats[0] > 0:
            raise RuntimeError(self._dry_message())
        self._record(stats)
        return self._broadcast(micro)

    def _stats(self, micro: list[dict] | None) -> torch.Tensor:
        """[ran dry, masked tokens per objective code, maskable tokens per objective code, tokens per source,
        (unit ordinal, next offset) per DP rank]. Only the reader of each model-parallel group fills its slots, so
        the all-reduce sum is every DP shard's counts once, and each rank's position in its own slot."""
        n_obj = len(OBJECTIVES)
        out = np.zeros(1 + 2 * n_obj + self.n_sources + 2 * self.dp_size, np.float64)
        if micro is None:
            out[0] = 1
        elif micro:
            last = micro[-1]
            at = 1 + 2 * n_obj + self.n_sources + 2 * self.dp_rank
            out[at:at + 2] = int(last["unit_ordinal"][-1]), int(last["unit_index"][-1]) + 1
        for b in micro or ():
            code = np.asarray(b["objective"], np.int64)
            out[1:1 + n_obj] += np.bincount(code, np.asarray(b["n_masked"], np.float64), n_obj)
            out[1 + n_obj:1 + 2 * n_obj] += np.bincount(code, np.asarray(b["n_maskable"], np.float64), n_obj)
            out[1 + 2 * n_obj:1 + 2 * n_obj + self.n_sources] += np.asarray(b["source_tokens"], np.float64).sum(0)
        return torch.from_numpy(out).to(self.device)

    def _record(self, stats: torch.Tensor) -> None:
        v = stats.cpu().numpy()
        n_obj = len(OBJECTIVES)
        end = 1 + 2 * n_obj + self.n_sources
        masked, maskable, src = v[1:1 + n_obj], v[1 + n_obj:1 + 2 * n_obj], v[1 + 2 * n_obj:end]
        tokens = tuple(int(a + b) for a, b in zip(self.pos.source_tokens, src))
        shards = tuple((int(v[end + 2 * r]), int(v[end + 2 * r + 1])) for r in range(self.dp_size))
        self.pos = DataPosition(self.pos.epoch, self.pos.index + self.global_batch, tokens, self.dp_size, shards)
        self.step_stats = {f"mask_fraction/{name}": masked[i] / maskable[i]
                           for i, name in enumerate(OBJECTIVES) if maskable[i] > 0}
        self.step_stats.update(passes(self.plan, tokens))

    def _dry_message(self) -> str:
        t, S = self.cfg.train, self.cfg.data.seq_length
        return (f"data: epoch {self.pos.epoch} of the stream ran dry after {self.pos.index} samples "
                f"({self.pos.index // self.global_batch} steps of train.global_batch_size={self.global_batch}); "
                f"train.train_steps={t.train_steps} over train.epochs={t.epochs} needs {self.per_epoch} samples "
                f"({self.per_epoch * S:,} tokens at data.seq_length={S}) of unique data per epoch. Add data to "
                f"data.sources, lower train.train_steps, or raise train.epochs to repeat the data on purpose "
                f"(`cglab plan` shows the data available against what a run needs)")


    def _broadcast(self, micro: list[dict]) -> list[dict]:
        n, b, s = self.n_micro, self.mb, self.cfg.data.seq_length
        arrays = {}
        for k in _INT_KEYS + ("loss_mask",) + _ROW_KEYS:
            shape, dtype = ((n, b, s) if k not in _ROW_KEYS else (n, b)), (
                torch.float32 if k == "loss_mask" else torch.int64)
            if self.reader:
                t = torch.from_numpy(np.stack([np.asarray(m[k]) for m in micro])).to(dtype)
            else:
                t = torch.empty(shape, dtype=dtype)
            t = t.to(self.device)
            if dist.get_world_size(self.group) > 1:
                dist.broadcast(t, src=self.src, group=self.group)
            arrays[k] = t
        return [{k: v[i] for k, v in arrays.items()} for i in range(n)]


def passes(plan, source_tokens) -> dict[str, float]:
    """`data/passes/<source>`: tokens read from each source so far over the tokens the source holds (the run
    plan's count, DataPlan.tokens_available; sources without a count are left out)."""
    avail = getattr(plan, "tokens_available", ()) or ()
    return {f"data/passes/{s.name}": n / a for s, n, a in zip(plan.sources, source_tokens, avail) if a}

def _maybe_fail(fault: dict | None, step: int) -> None:
    """Test hook: kill this worker process once, at a given step, to exercise failure recovery."""
    if not fault or step != fault["step"] or dist.get_rank() != fault.get("rank", 0):
        return
    marker = Path(fault["marker"])
    if marker.exists():
        return
    marker.write_text(str(step))
    if fault.get("mode") == "raise":
        raise RuntimeError(f"injected failure at step {step}")
    os.kill(os.getpid(), signal.SIGKILL)


def worker_loop(config: dict) -> None:
    import ray.train

    from cglab.distributed import init_parallel
    from cglab.track.metrics import TrainMetrics
    from cglab.track.mlflow_logger import RankZeroLogger
    from cglab.train.flops import device_peak_tflops, flops_per_token, mfu
    from cglab.train.step import build_train_state, train_step

    cfg = CGLabConfig.model_validate(config["cfg"])
    t, p = cfg.train, cfg.parallel
    device = None
    if p.use_gpu:
        device = ray.train.torch.get_device().index
    init_parallel(p.tensor_model_parallel_size, p.pipeline_model_parallel_size, seed=t.seed, device=device)
    state = build_train_state(cfg, lr_decay_steps=t.train_steps)  # decay over the whole budget (lesson 5)

    step, pos = 0, DataPosition()
    resumed_from = None
    ckpt = ray.train.get_checkpoint()
    with (ckpt.as_directory() if ckpt is not None else contextlib.nullcontext()) as d:
        good = checkpoint.newest_complete(d, config.get("run_dir"))
        if good is not None:
            step, pos = checkpoint.load(good, state)
            resumed_from = good
    feed = DataFeed(cfg, config["plan"], pos)
    start_step = step
    rank = dist.get_rank()
    logger = RankZeroLogger.from_context(config.get("mlflow"), rank=rank)
    prom = TrainMetrics(experiment=cfg.track.experiment, trial=config.get("name", ""), rank=rank)
    S = cfg.data.seq_length
    fpt = flops_per_token(cfg.model, S)
    peak = device_peak_tflops()
    tokens_per_step = t.global_batch_size * S
    staging = Path(tempfile.mkdtemp(prefix="cglab-ckpt-"))
    # A local record of every step (rank 0), when the run directory is on a filesystem this worker sees.
    run_dir = Path(config["run_dir"]) if config.get("run_dir") else None
    history = run_dir / "metrics.jsonl" if rank == 0 and run_dir is not None and run_dir.is_dir() else None
    if resumed_from and rank == 0:
        logger.log_metrics(step, {"resumed_at_step": step})

    while step < t.train_steps:
        t0 = time.perf_counter()
        micro = feed.next_step()
        t1 = time.perf_counter()
        out = train_step(state, cfg, micro)
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        t2 = time.perf_counter()
        step += 1
        _maybe_fail(config.get("fault"), step)
        metrics = {**out, "step": step, "epoch": feed.pos.epoch, "tokens_seen": step * tokens_per_step,
                   "data_wait_s": t1 - t0, "step_time_s": t2 - t0, "started_at_step": start_step,
                   "tokens_per_s": tokens_per_step / (t2 - t0), **feed.step_stats}
        if peak is not None:
            metrics["tflops"] = metrics["tokens_per_s"] * fpt / 1e12 / dist.get_world_size()
            metrics["mfu"] = mfu(metrics["tokens_per_s"], cfg.model, S, dist.get_world_size(), peak)
        save_now = step == t.train_steps or (t.checkpoint_every and step % t.checkpoint_every == 0)
        if save_now:
            c0 = time.perf_counter()
            d = checkpoint.save(checkpoint.local_dir(staging, step), state, step, feed.pos,
                                extra={"config": cfg.model_dump(mode="json")},
                                files={"tokenizer/tokenizer.json": config["plan"].tokenizer_json})
            metrics["checkpoint_s"] = time.perf_counter() - c0
            prom.checkpoint(metrics["checkpoint_s"])
        logger.log_metrics(step, metrics)
        if history is not None:
            with history.open("a") as f:
                f.write(json.dumps(metrics) + "\n")
        prom.report({**metrics, "tokens": tokens_per_step})
        if save_now:
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(str(d)))
            shutil.rmtree(d, ignore_errors=True)  # persisted by Ray; the staging copy is no longer needed
        elif step % t.log_every == 0:
            ray.train.report(metrics)
    logger.close()
