"""Process groups and Megatron parallel state, the same way on a laptop (gloo, CPU) and a GPU cluster (NCCL)."""

from __future__ import annotations

import functools
import os
import socket

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from megatron.core import parallel_state
from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

from cglab import compat


def init_parallel(tp: int = 1, pp: int = 1, *, seed: int = 1234, device: int | None = None) -> None:
    """Initialise torch.distributed (from the env: RANK, WORLD_SIZE, MASTER_ADDR/PORT, or a single process) and
    Megatron's TP x PP x DP groups. Safe to call when a process group already exists (Ray Train creates one)."""
    compat.apply("cpu")  # no CUDA: Megatron-Core on the CPU (a GPU process is left alone)
    if not dist.is_initialized():
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(_free_port()))
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        dist.init_process_group(
            backend, rank=int(os.environ.get("RANK", 0)), world_size=int(os.environ.get("WORLD_SIZE", 1))
        )
    if torch.cuda.is_available():
        torch.cuda.set_device(device if device is not None else int(os.environ.get("LOCAL_RANK", 0)))
    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    parallel_state.initialize_model_parallel(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp)
    torch.manual_seed(seed)
    model_parallel_cuda_manual_seed(seed)


def destroy_parallel() -> None:
    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _spawn_entry(rank: int, world: int, port: int, fn, args) -> None:
    os.environ.update(
        RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port)
    )
    try:
        fn(rank, *args)
    finally:
        destroy_parallel()


def spawn(fn, world_size: int, *args) -> None:
    """Run fn(rank, *args) in world_size fresh processes wired as one gloo/NCCL group on 127.0.0.1.
    fn must be importable (module-level). Raises if any process fails.

    The processes fork from Python's forkserver, which imported torch, Megatron and fn's module once for this
    process (importing them takes seconds of CPU a process, every call, under the `spawn` start method). The server
    never initialises CUDA or a process group, so each child starts as clean as a spawned one; it inherits the
    environment the server started with, and gets RANK, WORLD_SIZE and MASTER_* here."""
    _preload_forkserver(fn.__module__)
    mp.start_processes(
        _spawn_entry, args=(world_size, _free_port(), fn, args), nprocs=world_size, start_method="forkserver", join=True
    )


@functools.cache
def _preload_forkserver(module: str) -> None:
    """What the forkserver imports before its first fork (set before it starts; later calls cannot add to it, and a
    child imports its fn's module itself, on torch and Megatron already loaded)."""
    mp.set_forkserver_preload([__name__, module])
