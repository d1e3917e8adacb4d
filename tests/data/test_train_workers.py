"""The stream consumed by two Ray Train workers (TorchTrainer, 2 CPU workers, gloo): disjoint DP shards (each
worker reads only its own units of work) whose samples are the single-process stream's, epoch-dependent
corruption, and the same batches on every run."""

from __future__ import annotations

import numpy as np
import pytest

from cglab.config import from_dict
from cglab.data import pipeline

pytestmark = pytest.mark.slow
STEPS, MB = 3, 4


def _loop(config):
    import ray.train
    import torch.distributed as dist

    from cglab.config import from_dict as _from_dict
    from cglab.data.pipeline import iter_train_batches

    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    cfg = _from_dict(config["cfg"])
    out = {}
    for epoch in (0, 1):
        it = iter_train_batches(cfg, epoch, dp_rank=rank, dp_size=world, batch_size=MB, plan=config["plan"])
        batches = [next(it) for _ in range(STEPS)]
        it.close()
        for k in ("tokens", "labels", "sample_index", "unit", "unit_index"):
            out[f"e{epoch}_{k}"] = np.concatenate([b[k] for b in batches])
    # The gloo group is live: the workers agree on how many samples they consumed.
    import torch

    n = torch.tensor([len(out["e0_tokens"])])
    dist.all_reduce(n)
    out["total"] = np.array([int(n)])
    np.savez(f"{config['out']}/rank{rank}.npz", **out)


def test_two_train_workers_get_disjoint_seed_stable_shards(
    ray_local, micro_sources, micro_tokenizer, micro_cache, tmp_path
):
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    # one CPU per Train worker and some left for their Ray Data tasks, or the read tasks wait for ever
    assert ray_local.cluster_resources()["CPU"] >= 4, "tests/data's ray_local: test_train_workers needs 4 CPUs"
    cfg = from_dict(
        {
            "data": {
                "sources": micro_sources,
                "seq_length": 64,
                "mixture": "mix",
                "tokenizer": {"path": str(micro_tokenizer.path)},
                "cache_path": micro_cache,
            }
        }
    )
    plan = pipeline.prepare_data(cfg, run_dir=tmp_path / "run")
    assert (tmp_path / "run" / "tokenizer" / "tokenizer.json").is_file()
    out = tmp_path / "out"
    out.mkdir()
    TorchTrainer(
        _loop,
        train_loop_config={"cfg": cfg.model_dump(), "plan": plan, "out": str(out)},
        torch_config=TorchConfig(backend="gloo"),
        scaling_config=ScalingConfig(num_workers=2, use_gpu=False, resources_per_worker={"CPU": 1}),
        run_config=RunConfig(storage_path=str(tmp_path / "storage"), name="data"),
    ).fit()
    r = [dict(np.load(out / f"rank{i}.npz")) for i in range(2)]

    assert r[0]["total"][0] == r[1]["total"][0] == 2 * STEPS * MB
    n = STEPS * MB
    assert r[0]["e0_sample_index"].tolist() == r[1]["e0_sample_index"].tolist() == list(range(n))
    # Each worker read only its own unit of work (the micro corpus has two), and its samples are exactly the
    # single-process stream's samples of that unit.
    assert [set(x["e0_unit"].tolist()) for x in r] == [set(pipeline.assign_units(plan, 0, i, 2)) for i in range(2)]
    single = pipeline.iter_train_batches(cfg, 0, 0, 1, batch_size=100_000, plan=plan, drop_last=False)
    ref = next(single)
    single.close()
    row = {(u, i): j for j, (u, i) in enumerate(zip(ref["unit"].tolist(), ref["unit_index"].tolist()))}
    for x in r:
        rows = [row[(u, i)] for u, i in zip(x["e0_unit"].tolist(), x["e0_unit_index"].tolist())]
        assert np.array_equal(x["e0_tokens"], ref["tokens"][rows]) and np.array_equal(
            x["e0_labels"], ref["labels"][rows]
        )
    # Epoch 1 covers the same samples with freshly drawn corruption.
    assert r[0]["e1_unit_index"].tolist() == r[0]["e0_unit_index"].tolist()
    assert not np.array_equal(r[0]["e0_tokens"], r[0]["e1_tokens"])
