"""The reference run that test_preemption and test_trainer share: one uninterrupted run, trained once, whose
per-step losses both compare a resumed run against; and their local Ray."""

from __future__ import annotations

import pytest

from cglab.config import from_dict


def _local_ray():
    from cglab.raylocal import local_ray

    return local_ray(6, log_to_driver=True, configure_logging=True)


@pytest.fixture(scope="module")
def ray_local():
    """Per module, not per package: a module with a Ray of its own (test_feed's, 2 CPUs) must never find this one
    still up, whatever order the modules run in."""
    with _local_ray():
        yield


@pytest.fixture(scope="package")
def run_cfg(micro_sources, micro_tokenizer):
    """The tiny model on the micro corpus at sequence length 64, plus dotted overrides."""

    def make(*overrides):
        return from_dict(
            {"data": {"sources": micro_sources, "seq_length": 64, "tokenizer": {"path": str(micro_tokenizer.path)}}},
            [
                "model.preset=tiny",
                "model.max_position_embeddings=64",
                "train.micro_batch_size=2",
                "train.global_batch_size=4",
                "train.warmup_steps=1",
                "train.lr=1e-3",
                "data.filters.dedup=false",
                *overrides,
            ],
        )

    return make


@pytest.fixture(scope="package")
def reference_cfg(run_cfg):
    """60 steps of ~30-300 ms on CPU (a signal sent once a step is recorded lands long before the end) on two data
    parallel workers (the one not signalled or killed must stop, and resume, at the same step). Checkpointing and
    failure settings do not change losses: a test's interrupted run varies them and compares with this one."""
    return run_cfg("train.train_steps=60", "parallel.data_parallel_size=2", "track.system_metrics=false")


@pytest.fixture(scope="package")
def reference_losses(reference_cfg, tmp_path_factory):
    """Per-step losses of the reference config run once, uninterrupted, on a Ray of its own unless one is up (pytest
    sets up this package-scoped fixture before a module's ray_local; fit() would otherwise start one and leave it
    up)."""
    import contextlib

    import ray

    from cglab.train.trainer import fit, history

    with contextlib.nullcontext() if ray.is_initialized() else _local_ray():
        out = fit(reference_cfg, storage_path=str(tmp_path_factory.mktemp("reference")), name="reference")
    return {s: r["loss"] for s, r in history(out["run_dir"]).items()}
