"""cglab.decisions: each "auto" / None setting is resolved once per run, and `cglab plan` prints that same object."""

from __future__ import annotations

import pytest
import torch

from cglab import decisions
from cglab.config import from_dict

_RUN = [
    "model.preset=tiny",
    "train.micro_batch_size=2",
    "train.global_batch_size=4",
    "train.warmup_steps=0",
    "model.architecture=prefix_lm",
]


def _batches(n, mb=2, s=32):
    g = torch.Generator().manual_seed(0)
    out = []
    for _ in range(n):
        tok = torch.randint(0, 1000, (mb, s), generator=g)
        out.append(
            {
                "tokens": tok,
                "labels": torch.roll(tok, -1, 1),
                "loss_mask": torch.ones(mb, s),
                "segment_ids": torch.zeros(mb, s, dtype=torch.long),
                "prefix_end": torch.full((mb, s), 5, dtype=torch.long),
            }
        )
    return out


def test_a_run_resolves_the_attention_backend_and_the_adam_once(single_rank, monkeypatch):
    """Two steps of two micro-batches each: one resolution of the backend (it used to be one per micro-batch,
    plus the model build's two) and one of the Adam plan."""
    from cglab.train.step import build_train_state, train_step

    backend_calls, adam_calls = [], []
    choose, plan = decisions.choose_backend, decisions.adam_plan
    monkeypatch.setattr(decisions, "choose_backend", lambda *a, **k: backend_calls.append(a) or choose(*a, **k))
    monkeypatch.setattr(decisions, "adam_plan", lambda *a, **k: adam_calls.append(a) or plan(*a, **k))
    cfg = from_dict({}, _RUN)
    state = build_train_state(cfg)
    batches = _batches(4)
    for i in range(2):
        out = train_step(state, cfg, batches[2 * i : 2 * i + 2])
        assert out["update_ok"] == 1.0
    assert len(backend_calls) == 1 and len(adam_calls) == 1
    assert state.decisions.model.attention_backend == "sdpa"  # auto on CPU
    assert state.model[0].module.decisions is state.decisions.model  # the model keeps what it was built with


@pytest.mark.parametrize(
    "overrides, te",
    [
        ([], "auto"),
        (["parallel.use_gpu=true"], "auto"),
        (["parallel.use_gpu=true", "train.fold_grad_scale=true"], "yes"),
        (["parallel.use_gpu=true", "model.attention_dropout=0.1"], "no"),
    ],
)
def test_plan_prints_the_run_decisions_for_its_target(overrides, te):
    from cglab.plan import plan_run

    cfg = from_dict({}, ["model.preset=tiny", *overrides], cross_field=False)
    d = decisions.RunDecisions.resolve(cfg, decisions.Machine.target(cfg, te))
    plan = plan_run(cfg, te=te)
    sections = d.plan_sections(cfg)
    assert {k: plan[k] for k in sections} == sections
    assert (d.adam_error in plan["errors"]) if d.adam_error else d.adam is not None


def test_a_refused_decision_stops_the_run_before_it_builds():
    from cglab.config import ConfigError

    cfg = from_dict({}, ["model.preset=tiny", "train.fold_grad_scale=true"])
    d = decisions.RunDecisions.resolve(cfg, decisions.Machine(cuda=True, te=True, adam_impl="te"))
    assert d.adam is None and "train.fold_grad_scale" in d.adam_error
    with pytest.raises(ConfigError, match="train.fold_grad_scale: Megatron-Core builds TE's FusedAdam"):
        d.require()


def test_the_layer_spec_takes_only_a_resolved_backend():
    from cglab.model.spec import codegen_layer_spec

    with pytest.raises(ValueError, match="not a resolved attention backend"):
        codegen_layer_spec("auto")


@pytest.mark.parametrize(
    "overrides, on",
    [
        (["parallel.use_gpu=true", "parallel.data_parallel_size=4"], True),  # the default where DP > 1 on GPU
        (["parallel.use_gpu=true"], False),  # DP=1: nothing to split
        (["parallel.data_parallel_size=4"], False),  # CPU: off unless asked for
        (["parallel.use_gpu=true", "parallel.data_parallel_size=4", "parallel.distributed_optimizer=false"], False),
        (["parallel.data_parallel_size=4", "parallel.distributed_optimizer=true"], True),
    ],
)
def test_the_distributed_optimizer_is_the_default_where_dp_exceeds_one_on_gpu(overrides, on):
    """The plan shows where Adam's state lives and why; the memory plan splits it over DP exactly when it is on."""
    from cglab.train.memory import memory_gib

    cfg = from_dict({}, ["model.preset=codegen2-1B", "train.global_batch_size=8", *overrides])
    assert cfg.parallel.use_distributed_optimizer is on
    adam = decisions.RunDecisions.resolve(cfg, decisions.Machine.target(cfg)).plan_sections(cfg)["adam"]
    assert adam["distributed_optimizer"] is on
    assert adam["optimizer_state"].startswith("split over DP=4" if on else "whole on every rank")
    mem = memory_gib(cfg, "sdpa")
    per_param = (mem["optimizer"] * 2**30) / mem["params_per_gpu"]
    assert per_param == pytest.approx(8 / (4 if on else 1), rel=1e-3)  # fp32: Adam's two moments


def test_fold_grad_scale_names_the_default_distributed_optimizer():
    from cglab.config import ConfigError

    gpu_dp = [
        "model.preset=tiny",
        "parallel.use_gpu=true",
        "parallel.data_parallel_size=2",
        "train.fold_grad_scale=true",
    ]
    with pytest.raises(ConfigError, match="train.fold_grad_scale: not available with the distributed optimizer"):
        from_dict({}, gpu_dp)
    assert not from_dict({}, [*gpu_dp, "parallel.distributed_optimizer=false"]).parallel.use_distributed_optimizer


@pytest.mark.parametrize(
    "overrides, on",
    [
        ([], False),
        (["parallel.use_gpu=true"], True),
        (["parallel.use_gpu=true", "train.async_save=false"], False),
        (["train.async_save=true"], True),
    ],
)
def test_checkpoints_are_written_in_the_background_by_default_on_gpu(overrides, on):
    """train.async_save: None is on for a GPU run, off on the CPU; the plan shows the choice and why."""
    cfg = from_dict({}, ["model.preset=tiny", *overrides])
    d = decisions.RunDecisions.resolve(cfg, decisions.Machine.target(cfg))
    assert d.async_save is on
    shown = d.plan_sections(cfg)["checkpoint"]
    assert shown["async_save"] is on
    assert shown["why"].startswith("set by train.async_save" if cfg.train.async_save is not None else "auto on")
