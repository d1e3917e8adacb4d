"""Training through Ray Train on CPU: TP/PP layouts agree, a killed worker resumes exactly, a failing worker
fails the whole group instead of hanging it."""

import pytest

from cglab.config import from_dict
from cglab.train.trainer import fit, history

pytestmark = pytest.mark.slow


def _losses(out):
    return {s: r["loss"] for s, r in history(out["run_dir"]).items()}


def test_tp2_pp2_reaches_the_losses_of_tp1(ray_local, run_cfg, tmp_path):
    """The whole training path (feed, Megatron TP x PP model, grad reductions, optimizer) at TP=2 x PP=2 with the GPU
    default's gradient fold (1/tokens and the clip inside fused AdamW) against TP=1 without it. One parallel run: TP
    and PP alone are matched against a single rank in tests/model/test_parallel.py (forward and grads, in-process),
    and the fold against the two-pass update in tests/compat/test_gradscale.py; each extra run here costs its four
    worker processes' start (~30 s of CI)."""
    base = ["train.train_steps=3"]
    ref = _losses(fit(run_cfg(*base), storage_path=str(tmp_path), name="tp1"))
    assert sorted(ref) == [1, 2, 3] and all(5.0 < v < 8.0 for v in ref.values())  # ~ln(1024) at init
    ov = [
        "parallel.tensor_model_parallel_size=2",
        "parallel.pipeline_model_parallel_size=2",
        "train.fold_grad_scale=true",
    ]
    got = _losses(fit(run_cfg(*base, *ov), storage_path=str(tmp_path), name="tp2pp2"))
    assert got == pytest.approx(ref, abs=1e-4)


def test_killed_worker_resumes_from_checkpoint_with_identical_losses(
    ray_local, reference_cfg, reference_losses, tmp_path
):
    """The reference run (tests/train/conftest.py, also test_preemption's) with checkpoints written in the background
    (train.async_save) every 20 steps and one worker killed at step 41, while the checkpoint of step 40 is being
    written: its write is finalized no earlier than step 41's Checkpointer, which the kill precedes (FaultInjection
    is first), so it never became COMPLETE nor reached Ray Train. Ray Train restarts the group, which resumes from
    step 20's checkpoint (handed on once its write ended) and ends with the reference's losses."""
    every = reference_cfg.train.train_steps // 3
    cfg = from_dict(
        reference_cfg.model_dump(mode="json"),
        [f"train.checkpoint_every={every}", "train.max_failures=1", "train.async_save=true"],
    )
    killed_at = 2 * every + 1
    fault = {"step": killed_at, "rank": 1, "marker": str(tmp_path / "kill-marker")}
    out = fit(cfg, storage_path=str(tmp_path), name="killed", fault=fault)
    assert (tmp_path / "kill-marker").read_text() == str(killed_at)  # the worker really was killed, once, there
    resumed = history(out["run_dir"])
    assert resumed[every]["started_at_step"] == 0
    # the second attempt began at the last checkpoint whose write had ended, not at the one in flight nor from scratch
    assert resumed[every + 1]["started_at_step"] == every
    assert sorted(resumed) == sorted(reference_losses)
    for step, loss in reference_losses.items():
        assert resumed[step]["loss"] == pytest.approx(loss, abs=1e-5), step


def test_exception_on_one_worker_fails_the_group(ray_local, run_cfg, tmp_path):
    cfg = run_cfg("train.train_steps=50", "parallel.data_parallel_size=2")
    fault = {"step": 2, "rank": 1, "marker": str(tmp_path / "raise-marker"), "mode": "raise"}
    with pytest.raises(Exception) as err:
        fit(cfg, storage_path=str(tmp_path), name="raise", fault=fault)
    assert "injected failure" in str(err.value) or "injected failure" in repr(err.value.__cause__)
    assert len(history(tmp_path / "raise")) < 50  # the run stopped; nobody kept training or waiting
