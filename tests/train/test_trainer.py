"""Training through Ray Train on CPU: TP/PP layouts agree, a killed worker resumes exactly, a failing worker
fails the whole group instead of hanging it."""

import pytest

from cglab.config import from_dict
from cglab.train.trainer import fit, history

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def ray_local():
    from cglab.raylocal import local_ray

    with local_ray(6, log_to_driver=True, configure_logging=True):
        yield


def _cfg(micro_sources, tokenizer_dir, *overrides):
    return from_dict(
        {"data": {"sources": micro_sources, "seq_length": 64, "tokenizer": {"path": str(tokenizer_dir)}}},
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


def _losses(out):
    return {s: r["loss"] for s, r in history(out["run_dir"]).items()}


def test_tp2_pp2_reaches_the_losses_of_tp1(ray_local, micro_sources, micro_tokenizer, tmp_path):
    """The whole training path (feed, Megatron TP x PP model, grad reductions, optimizer) at TP=2 x PP=2 with the GPU
    default's gradient fold (1/tokens and the clip inside fused AdamW) against TP=1 without it. One parallel run: TP
    and PP alone are matched against a single rank in tests/model/test_parallel.py (forward and grads, in-process),
    and the fold against the two-pass update in tests/compat/test_gradscale.py; each extra run here costs its four
    worker processes' start (~30 s of CI)."""
    base = ["train.train_steps=3"]
    ref = _losses(fit(_cfg(micro_sources, micro_tokenizer.path, *base), storage_path=str(tmp_path), name="tp1"))
    assert sorted(ref) == [1, 2, 3] and all(5.0 < v < 8.0 for v in ref.values())  # ~ln(1024) at init
    ov = [
        "parallel.tensor_model_parallel_size=2",
        "parallel.pipeline_model_parallel_size=2",
        "train.fold_grad_scale=true",
    ]
    got = _losses(fit(_cfg(micro_sources, micro_tokenizer.path, *base, *ov), storage_path=str(tmp_path), name="tp2pp2"))
    assert got == pytest.approx(ref, abs=1e-4)


def test_killed_worker_resumes_from_checkpoint_with_identical_losses(
    ray_local, micro_sources, micro_tokenizer, tmp_path
):
    ov = ["train.train_steps=6", "train.checkpoint_every=2", "parallel.data_parallel_size=2", "train.max_failures=1"]
    cfg = _cfg(micro_sources, micro_tokenizer.path, *ov)
    clean = _losses(fit(cfg, storage_path=str(tmp_path), name="clean"))
    fault = {"step": 3, "rank": 1, "marker": str(tmp_path / "kill-marker")}
    out = fit(cfg, storage_path=str(tmp_path), name="killed", fault=fault)
    assert (tmp_path / "kill-marker").exists()  # the worker really was killed once
    resumed = history(out["run_dir"])
    assert resumed[2]["started_at_step"] == 0
    assert resumed[3]["started_at_step"] == 2  # the second attempt began at the step-2 checkpoint, not from scratch
    assert resumed[6]["loss"] == pytest.approx(clean[6], abs=1e-5)
    for step in (3, 4, 5, 6):
        assert resumed[step]["loss"] == pytest.approx(clean[step], abs=1e-5), step


def test_exception_on_one_worker_fails_the_group(ray_local, micro_sources, micro_tokenizer, tmp_path):
    cfg = _cfg(micro_sources, micro_tokenizer.path, "train.train_steps=50", "parallel.data_parallel_size=2")
    fault = {"step": 2, "rank": 1, "marker": str(tmp_path / "raise-marker"), "mode": "raise"}
    with pytest.raises(Exception) as err:
        fit(cfg, storage_path=str(tmp_path), name="raise", fault=fault)
    assert "injected failure" in str(err.value) or "injected failure" in repr(err.value.__cause__)
    assert len(history(tmp_path / "raise")) < 50  # the run stopped; nobody kept training or waiting
