"""The training feed: the micro-batches of each global step, identical on every model-parallel peer.

One rank per model-parallel group (TP x PP peers share a data-parallel rank) reads its DP shard (its own units of
work, data/pipeline.py) from the Ray Data pipeline and broadcasts the step's micro-batches to its peers, so peers
see identical batches at no extra read. The data position (epoch, samples used, and each DP rank's (unit, offset))
lives in the checkpoint; on resume each rank rebuilds its stream from its own unit, skipping the units before it
unread (Ray Data iterators cannot resume mid-epoch; `streaming_split` would give TP peers different data).
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps

from cglab.config import CGLabConfig, ConfigError
from cglab.data.contract import FIELDS, FLOAT_FIELDS, OBJECTIVES, PER_SAMPLE
from cglab.data.pipeline import iter_train_batches
from cglab.train.checkpoint import DataPosition


class DataFeed:
    """The micro-batches of each global step, identical on every model-parallel peer.

    An epoch is `ceil(train.train_steps / train.epochs)` global batches of the stream; the next epoch starts only
    when that budget is used (lesson 5). A stream that runs dry before it is an error with the numbers, never a
    silent extra pass over the data. DP ranks hold different numbers of samples (whole units each): every step
    takes the same number from every rank, so an epoch can last only as long as the shortest shard, and what the
    longer shards hold beyond it is not trained on in that epoch (the budget error names the numbers). Each step
    also records every rank's (unit, offset) in the position, and adds up, over every data-parallel shard, the
    masked fraction per objective, the tokens read from each source (DataPosition.source_tokens: passes per
    source; their sum is data/raw_tokens) and the tokens trained on (DataPosition.loss_tokens, data/loss_tokens).

    With train.stop_at=raw_tokens or loss_tokens the run's length is train.token_budget of that count: an epoch
    ends once its share (budget / train.epochs) is used, `done` says when the budget is, and `progress` is the
    LR schedule's advance for the step.
    """

    def __init__(self, cfg: CGLabConfig, plan, pos: DataPosition):
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
            raise RuntimeError(
                f"data: the checkpoint's data position (epoch {pos.epoch}, sample {pos.index}) has "
                f"no per-rank positions (written before sharded reading); restart the epoch "
                f"from a new run"
            )
        if pos.shards and pos.dp_size != self.dp_size:
            raise ConfigError(
                f"parallel.data_parallel_size: the checkpoint was written with "
                f"data_parallel_size={pos.dp_size}, this run has {self.dp_size}; each rank's data "
                f"position is a place in its own units of work, which are assigned per DP size, so "
                f"it cannot be remapped: resume with data_parallel_size={pos.dp_size}"
            )
        self.pos = DataPosition(pos.epoch, pos.index, tokens, pos.dp_size, tuple(pos.shards), pos.loss_tokens)
        self.progress = 0.0  # the LR schedule's nominal steps for the last step (1 when counting steps)
        self.step_stats: dict[str, float] = {}
        self._it = None
        self.device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else "cpu"

    def _fetch(self) -> list[dict] | None:
        if self._it is None:
            start = self.pos.shards[self.dp_rank] if self.pos.shards else (0, 0)
            self._it = iter_train_batches(
                self.cfg, self.pos.epoch, self.dp_rank, self.dp_size, start, self.mb, self.plan
            )
        micro = []
        for _ in range(self.n_micro):
            b = next(self._it, None)
            if b is None:
                return None
            micro.append(b)
        return micro

    def count(self) -> int:
        """The run's length so far in train.stop_at's unit: raw or loss tokens (steps: this epoch's samples)."""
        p = self.pos
        return {"raw_tokens": p.raw_tokens, "loss_tokens": p.loss_tokens}.get(self.cfg.train.stop_at, p.index)

    def done(self, step: int) -> bool:
        """Whether the run is complete after `step` steps: train.train_steps of them, or with a token budget that
        budget reached (train.train_steps then only lays out the LR schedule)."""
        t = self.cfg.train
        return step >= t.train_steps if t.stop_at == "steps" else self.count() >= t.token_budget

    def _epoch_used(self) -> bool:
        t = self.cfg.train
        if t.stop_at == "steps":
            return self.pos.index + self.global_batch > self.per_epoch
        return self.count() >= t.token_budget * (self.pos.epoch + 1) / t.epochs

    def next_step(self) -> list[dict]:
        if self._epoch_used():  # this epoch's share of the budget is used
            if self.pos.epoch + 1 >= self.cfg.train.epochs:
                raise RuntimeError(
                    f"data: all train.epochs={self.cfg.train.epochs} epochs of "
                    f"{self.per_epoch} samples are used; train.train_steps asks for more"
                )
            p = self.pos
            self.pos, self._it = DataPosition(p.epoch + 1, 0, p.source_tokens, loss_tokens=p.loss_tokens), None
        micro = self._fetch() if self.reader else []
        stats = self._stats(micro)
        dist.all_reduce(stats)  # sums: every shard's counts, and whether any shard ran dry
        if stats[0] > 0:
            raise RuntimeError(self._dry_message())
        self._record(stats)
        return self._broadcast(micro)

    def _stats(self, micro: list[dict] | None) -> torch.Tensor:
        """[ran dry, masked tokens per objective code, maskable tokens per objective code, tokens per source, loss
        tokens, (unit ordinal, next offset) per DP rank]. Only the reader of each model-parallel group fills its
        slots, so the all-reduce sum is every DP shard's counts once, and each rank's position in its own slot."""
        n_obj = len(OBJECTIVES)
        out = np.zeros(2 + 2 * n_obj + self.n_sources + 2 * self.dp_size, np.float64)
        if micro is None:
            out[0] = 1
        elif micro:
            last = micro[-1]
            at = 2 + 2 * n_obj + self.n_sources + 2 * self.dp_rank
            out[at : at + 2] = int(last["unit_ordinal"][-1]), int(last["unit_index"][-1]) + 1
        for b in micro or ():
            code = np.asarray(b["objective"], np.int64)
            out[1 : 1 + n_obj] += np.bincount(code, np.asarray(b["n_masked"], np.float64), n_obj)
            out[1 + n_obj : 1 + 2 * n_obj] += np.bincount(code, np.asarray(b["n_maskable"], np.float64), n_obj)
            out[1 + 2 * n_obj : 1 + 2 * n_obj + self.n_sources] += np.asarray(b["source_tokens"], np.float64).sum(0)
            out[1 + 2 * n_obj + self.n_sources] += float(np.asarray(b["loss_mask"], np.float64).sum())
        return torch.from_numpy(out).to(self.device)

    def _record(self, stats: torch.Tensor) -> None:
        v = stats.cpu().numpy()
        n_obj = len(OBJECTIVES)
        end = 1 + 2 * n_obj + self.n_sources
        masked, maskable, src = v[1 : 1 + n_obj], v[1 + n_obj : 1 + 2 * n_obj], v[1 + 2 * n_obj : end]
        tokens = tuple(int(a + b) for a, b in zip(self.pos.source_tokens, src))
        loss_tokens = self.pos.loss_tokens + int(v[end])
        shards = tuple((int(v[end + 1 + 2 * r]), int(v[end + 2 + 2 * r])) for r in range(self.dp_size))
        before = self.count()
        self.pos = DataPosition(
            self.pos.epoch, self.pos.index + self.global_batch, tokens, self.dp_size, shards, loss_tokens
        )
        t = self.cfg.train
        self.progress = 1.0 if t.stop_at == "steps" else t.train_steps * (self.count() - before) / t.token_budget
        self.step_stats = {
            f"mask_fraction/{name}": masked[i] / maskable[i] for i, name in enumerate(OBJECTIVES) if maskable[i] > 0
        }
        self.step_stats["data/raw_tokens"] = float(self.pos.raw_tokens)
        self.step_stats["data/loss_tokens"] = float(loss_tokens)
        if t.stop_at != "steps":
            self.step_stats["data/budget_used"] = self.count() / t.token_budget
        self.step_stats.update(passes(self.plan, tokens))
        self.step_stats.update(token_shares(self.plan, tokens))

    def _dry_message(self) -> str:
        t, S = self.cfg.train, self.cfg.data.seq_length
        return (
            f"data: epoch {self.pos.epoch} of the stream ran dry after {self.pos.index} samples "
            f"({self.pos.index // self.global_batch} steps of train.global_batch_size={self.global_batch}); "
            f"train.train_steps={t.train_steps} over train.epochs={t.epochs} needs {self.per_epoch} samples "
            f"({self.per_epoch * S:,} tokens at data.seq_length={S}) of unique data per epoch. Add data to "
            f"data.sources, lower train.train_steps, or raise train.epochs to repeat the data on purpose "
            f"(`cglab plan` shows the data available against what a run needs)"
        )

    def _broadcast(self, micro: list[dict]) -> list[dict]:
        n, b, s = self.n_micro, self.mb, self.cfg.data.seq_length
        arrays = {}
        for k in FIELDS:
            shape = (n, b) if k in PER_SAMPLE else (n, b, s)
            dtype = torch.float32 if k in FLOAT_FIELDS else torch.int64
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
    return {f"data/passes/{s.name}": n / a for s, n, a in zip(plan.sources, source_tokens, plan.tokens_available) if a}


def token_shares(plan, source_tokens) -> dict[str, float]:
    """`data/token_share/<source>`: each source's share of the tokens read so far (over every DP shard), to set
    beside the planned share (`cglab plan`'s tokens_needed.token_share, the mixture weights with data.mix_by=tokens)."""
    total = sum(source_tokens)
    return {f"data/token_share/{s.name}": n / total for s, n in zip(plan.sources, source_tokens)} if total else {}
