"""Runs in spawned processes: a run's first training step from `model.init_from`, at a given TP x PP."""

import torch


def first_losses(rank, tp, pp, sources, batches_path, out_path):
    """{source: the first step's loss of a run started from it} to out_path (rank 0)."""
    from cglab.config import from_dict
    from cglab.distributed import init_parallel
    from cglab.train.step import build_train_state, train_step

    init_parallel(tp, pp)
    losses = {}
    for src in sources:
        cfg = from_dict(
            {},
            [
                "model.preset=tiny",
                f"parallel.tensor_model_parallel_size={tp}",
                f"parallel.pipeline_model_parallel_size={pp}",
                "train.micro_batch_size=2",
                "train.global_batch_size=4",
                f"model.init_from={src}",
            ],
        )
        losses[src] = train_step(build_train_state(cfg), cfg, torch.load(batches_path))["loss"]
    if rank == 0:
        torch.save(losses, out_path)
