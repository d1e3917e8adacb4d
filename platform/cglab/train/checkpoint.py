"""Checkpoints: Megatron dist_checkpointing (model + optimizer, any TP/PP layout) plus the scheduler, every rank's
RNG state and the data position, as one directory that Ray Train persists.

Each rank writes into its own local directory; Ray Train merges the ranks' directories into one checkpoint in
persistent storage. Rank 0 writes `manifest.json` (every file of every rank, with its size) and then `COMPLETE`,
after a barrier that every rank reaches only once its files are written: in the last finalize function of
Megatron's AsyncRequest, whether the write ran within the step (`save`) or in the background (`request`,
train/checkpoint_writes.py). `verify` refuses a directory whose manifest or files don't add up, so a checkpoint cut
off mid-write is never taken for a good one.
"""

from __future__ import annotations

import json
import os
import random
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from cglab.config import ModelConfig
from cglab.data.contract import EOT, PAD

MARKER, MANIFEST, STATE = "COMPLETE", "manifest.json", "trainer_state.json"


class IncompleteCheckpoint(RuntimeError):
    pass


@dataclass
class DataPosition:
    """Where the sample stream stands: `index` samples of `epoch` are used (steps x global batch), and each DP
    rank r resumes at `shards[r] = (k, offset)`: sample `offset` of its k-th unit of work (data/pipeline.py).

    The per-rank positions hold for the layout that wrote them (`dp_size`); units are assigned per DP size, so
    another data_parallel_size cannot map them (train/feed.py DataFeed refuses it, naming the field).
    """

    epoch: int = 0
    index: int = 0
    # tokens read from each data source so far, over every epoch (passes per source); () in older checkpoints
    source_tokens: tuple[int, ...] = ()
    dp_size: int = 0  # 0: no per-rank positions (start of an epoch, or a checkpoint older than issue 14)
    shards: tuple[tuple[int, int], ...] = ()
    loss_tokens: int = 0  # tokens trained on so far (loss-mask sum over every DP shard); 0 in older checkpoints

    @property
    def raw_tokens(self) -> int:
        """Document tokens that entered samples so far, over every DP shard (each source's count summed)."""
        return sum(self.source_tokens)


def _unwrap(model):
    while hasattr(model, "module"):
        model = model.module
    return model


def _rng_state() -> dict:
    s = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        s["cuda"] = torch.cuda.get_rng_state()
    # Megatron: kept off the readers of checkpoint metadata (the sweep's preflight, `cglab eval`)
    from megatron.core.tensor_parallel.random import get_cuda_rng_tracker

    s["tracker"] = get_cuda_rng_tracker().get_states()
    return s


def _set_rng_state(s: dict) -> None:
    random.setstate(s["python"])
    np.random.set_state(s["numpy"])
    torch.set_rng_state(s["torch"])
    if torch.cuda.is_available() and "cuda" in s:
        torch.cuda.set_rng_state(s["cuda"])
    # Megatron: kept off the readers of checkpoint metadata (the sweep's preflight, `cglab eval`)
    from megatron.core.tensor_parallel.random import get_cuda_rng_tracker

    get_cuda_rng_tracker().set_states(s["tracker"])


def _sharded(state, is_loading: bool, model_only: bool = False) -> dict:
    model = _unwrap(state.model[0])
    msd = model.sharded_state_dict()
    if model_only:
        return {"model": msd}
    return {"model": msd, "optimizer": state.optimizer.sharded_state_dict(msd, is_loading=is_loading)}


def save(
    directory: str | Path,
    state,
    step: int,
    data: DataPosition,
    extra: dict | None = None,
    files: dict[str, str] | None = None,
) -> Path:
    """Collective: every rank calls it with its own (empty or new) local directory. `files` (relative path ->
    text) are written by rank 0, e.g. the tokenizer, so a checkpoint is self-contained. Returns once the checkpoint
    is complete; `request` is the same checkpoint written in the background (cglab.train.checkpoint_writes)."""
    req = request(directory, state, step, data, extra, files)
    req.execute_sync()  # write, barrier, then the finalize functions: Megatron's metadata, then `_seal`
    return Path(directory)


def request(
    directory: str | Path,
    state,
    step: int,
    data: DataPosition,
    extra: dict | None = None,
    files: dict[str, str] | None = None,
):
    """Collective: one checkpoint as Megatron-Core's AsyncRequest. Its write (the model's and optimizer's shards,
    from tensors already staged in host memory) is left to the caller, synchronous (`save`) or in a background
    process (cglab.train.checkpoint_writes); what is small is written now, as of this step: this rank's RNG and, by
    rank 0, the trainer state (step, data position, scheduler) and `files`. Its finalize functions run on every
    rank once every rank's write ended: Megatron's (the shards' index, metadata.json), then `_seal` (manifest,
    COMPLETE), so no checkpoint is complete before its write is."""
    # Megatron: kept off the readers of checkpoint metadata (the sweep's preflight, `cglab eval`)
    from megatron.core import dist_checkpointing

    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    rank = dist.get_rank()
    req = dist_checkpointing.save(_sharded(state, is_loading=False), str(d), async_sharded_save=True)
    torch.save(_rng_state(), d / f"rng_rank{rank}.pt")
    if rank == 0:
        doc = {"step": step, "data": asdict(data), "scheduler": state.scheduler.state_dict(), **(extra or {})}
        (d / STATE).write_text(json.dumps(doc, indent=1))
        for rel, text in (files or {}).items():
            (d / rel).parent.mkdir(parents=True, exist_ok=True)
            (d / rel).write_text(text)
    req.add_finalize_fn(partial(_seal, d, step))
    return req


def _seal(d: Path, step: int) -> None:
    """Collective, last: rank 0 writes the manifest (every rank's files, with their sizes) and then COMPLETE."""
    files = {str(p.relative_to(d)): p.stat().st_size for p in d.rglob("*") if p.is_file()}
    everyone: list = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, files)  # also the barrier: every rank's files are final
    if dist.get_rank() == 0:
        manifest = {"world_size": dist.get_world_size(), "files": {k: v for f in everyone for k, v in f.items()}}
        (d / MANIFEST).write_text(json.dumps(manifest, indent=1))
        (d / MARKER).write_text(str(step))


def save_model(directory: str | Path, state, step: int, extra: dict | None = None, files: dict | None = None) -> Path:
    """Collective: the model's weights only (no optimizer, scheduler or RNG: a 1B model's Adam state is 16 GB),
    in the checkpoint's TP x PP sharded format with its manifest and COMPLETE marker, so `checkpoint_to_hf`
    converts it; it cannot be resumed from (`load` needs the optimizer). As `save`, every rank writes its own
    files into its own local `directory` (nodes share no file system); the union of the ranks' directories is the
    snapshot, and rank 0's holds the manifest of all of them (cglab.eval.periodic uploads them to storage)."""
    # Megatron: kept off the readers of checkpoint metadata (the sweep's preflight, `cglab eval`)
    from megatron.core import dist_checkpointing

    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    rank = dist.get_rank()
    dist_checkpointing.save(_sharded(state, is_loading=False, model_only=True), str(d))
    if rank == 0:
        doc = {"step": step, "model_only": True, **(extra or {})}
        (d / STATE).write_text(json.dumps(doc, indent=1))
        for rel, text in (files or {}).items():
            (d / rel).parent.mkdir(parents=True, exist_ok=True)
            (d / rel).write_text(text)
    listed = {str(p.relative_to(d)): p.stat().st_size for p in d.rglob("*") if p.is_file()}
    everyone: list = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, listed)  # also the barrier: every rank has finished writing
    if rank == 0:
        manifest = {"world_size": dist.get_world_size(), "files": {k: v for f in everyone for k, v in f.items()}}
        (d / MANIFEST).write_text(json.dumps(manifest, indent=1))
        (d / MARKER).write_text(str(step))
    return d


def verify(directory: str | Path) -> dict:
    """The manifest of a complete checkpoint, or IncompleteCheckpoint saying what is missing."""
    d = Path(directory)
    if not (d / MARKER).is_file() or not (d / MANIFEST).is_file():
        raise IncompleteCheckpoint(f"{d}: no {MARKER} marker (the write was interrupted)")
    manifest = json.loads((d / MANIFEST).read_text())
    for name, size in manifest["files"].items():
        p = d / name
        if not p.is_file():
            raise IncompleteCheckpoint(f"{d}: {name} is missing")
        if p.stat().st_size != size:
            raise IncompleteCheckpoint(f"{d}: {name} has {p.stat().st_size} bytes, the manifest says {size}")
    return manifest


def load(directory: str | Path, state) -> tuple[int, DataPosition]:
    """Collective: restore model, optimizer, scheduler and this rank's RNG; returns (step, data position)."""
    # Megatron: kept off the readers of checkpoint metadata (the sweep's preflight, `cglab eval`)
    from megatron.core import dist_checkpointing

    d = Path(directory)
    manifest = verify(d)
    if manifest["world_size"] != dist.get_world_size():
        raise IncompleteCheckpoint(
            f"{d}: written by {manifest['world_size']} ranks, loading with {dist.get_world_size()}"
        )
    loaded = dist_checkpointing.load(_sharded(state, is_loading=True), str(d))
    _unwrap(state.model[0]).load_state_dict(loaded["model"])
    state.optimizer.load_state_dict(loaded["optimizer"])
    doc = json.loads((d / STATE).read_text())
    state.scheduler.load_state_dict(doc["scheduler"])
    _set_rng_state(torch.load(d / f"rng_rank{dist.get_rank()}.pt", weights_only=False))
    data = doc["data"]
    return int(doc["step"]), DataPosition(
        int(data["epoch"]),
        int(data["index"]),
        tuple(int(n) for n in data.get("source_tokens", ())),
        int(data.get("dp_size", 0)),
        tuple((int(k), int(o)) for k, o in data.get("shards", ())),
        int(data.get("loss_tokens", 0)),
    )


def newest_complete(*places: str | Path | None) -> str | None:
    """The complete checkpoint with the highest step among the given checkpoint directories and the
    `checkpoint_*` directories inside the given run directories; None if there is none.

    Ray Train registers a checkpoint only once the controller has collected every worker's report, so a worker
    killed right after reporting can leave a complete, persisted checkpoint that Ray does not hand back. Our
    marker and manifest say which directories are whole, so they are searched directly (local or shared storage).
    """
    candidates: list[Path] = []
    for place in places:
        if place is None or not Path(place).is_dir():
            continue
        p = Path(place)
        candidates += [p] if (p / MANIFEST).exists() or (p / STATE).exists() else sorted(p.glob("checkpoint_*"))
    best, best_step = None, -1
    for c in candidates:
        try:
            verify(c)
            step = json.loads((c / STATE).read_text())["step"]
        except (IncompleteCheckpoint, OSError, ValueError, KeyError):
            continue
        if step > best_step:
            best, best_step = str(c), step
    return best


def local_dir(root: str | Path, step: int) -> Path:
    """A fresh per-rank staging directory for one checkpoint."""
    return Path(root) / f"step{step:08d}-rank{dist.get_rank()}-pid{os.getpid()}"


# ---------------------------------------------------------------------------------------------- export
def model_config(directory: str | Path) -> ModelConfig:
    """The ModelConfig a complete checkpoint was trained with (IncompleteCheckpoint if it is not complete)."""
    d = Path(directory)
    verify(d)
    return ModelConfig.model_validate(json.loads((d / STATE).read_text())["config"]["model"])


def to_full_state_dict(directory: str | Path):
    """(full cglab state dict, ModelConfig) from a checkpoint of any TP/PP layout, in one process."""
    from cglab.model import hf_export  # Megatron's loader: kept off the paths that only read MARKER

    m = model_config(directory)
    return hf_export.full_state_dict(directory), m


def checkpoint_to_hf(directory: str | Path, out_dir: str | Path) -> Path:
    """Export a checkpoint as a HF CodeGenForCausalLM directory (with its tokenizer when the checkpoint has one):
    this module checks the directory is a complete cglab checkpoint, `cglab.model.hf_export` converts it."""
    from cglab.model import hf_export  # Megatron's loader: kept off the paths that only read MARKER

    m = model_config(directory)
    tok = Path(directory) / "tokenizer"
    return hf_export.export_checkpoint(directory, m, out_dir, tokenizer_dir=tok, specials=(EOT, PAD))
