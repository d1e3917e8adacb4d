"""The evaluation while training in `cglab plan` (cglab.train.eval_cost): where its task runs, one evaluation's
estimated cost worked by hand from the measured constants, whether due evaluations are skipped, and the end wait's
bound, which is what the callback waits (no Ray, no worker: the plan and the callback's inputs only)."""

from __future__ import annotations

import math
from pathlib import Path
from types import SimpleNamespace

import pytest

from cglab.config import ConfigError, load_config
from cglab.train.plan import text

REPO = Path(__file__).resolve().parents[2]
ONE_GPU_1B = REPO / "jobs" / "configs" / "codegen2_1b_1gpu.yaml"


def _plan(*overrides):
    from cglab.plan import plan_run

    return plan_run(load_config(ONE_GPU_1B, list(overrides)))


def test_the_plan_places_and_costs_a_1b_evaluation_and_bounds_the_end_wait_by_it():
    """codegen2-1B on one GPU with eval.every=100: the task on 1 CPU, no GPU; no data scanned, so each kind's
    held-out budget (32,768 tokens) is taken as full 2048-token documents: 16 NL, 16 code, 16 infill examples
    padded to 2048; at the measured cost per token it takes far longer than 100 steps' estimated time, so due
    evaluations are skipped (a warning), and the end waits twice the estimate plus the floor."""
    from cglab.train import eval_cost as ec

    plan = _plan("eval.every=100")
    pe = plan["periodic_eval"]
    assert pe["resources"] == {"num_cpus": 1.0, "num_gpus": 0.0} and pe["placement"].startswith("CPU")
    n = plan["budget"]["parameters"]["total"]
    docs, S = 16, 2048
    assert pe["text_tokens"] == {"nl": docs * S, "code": docs * S, "infill": docs * S}
    est = 3 * docs * S * (ec.TEXT_S_PER_TOKEN + ec.TEXT_S_PER_PARAM_TOKEN * n)
    assert pe["estimate_s"] == round(est, 1) and "ESTIMATE" in pe["method"]
    step_s = 64 * S / plan["budget"]["tokens_per_s"]
    assert pe["interval_s"] == round(100 * step_s, 1)
    assert pe["due_per_evaluation"] == math.ceil(est / (100 * step_s)) > 1
    assert any(w.startswith("eval.every=100") and "skipped" in w for w in plan["warnings"])
    assert pe["end_wait_s"] == round(ec.END_WAIT_FACTOR * est + ec.END_WAIT_FLOOR_S, 1)
    assert pe["end_wait_gpu_hours"] == round(pe["end_wait_s"] / 3600, 2)
    printed = text(plan)  # `cglab plan`'s table
    assert "\nperiodic_eval:\n" in printed and f"  end_wait_s: {pe['end_wait_s']}" in printed
    assert f"  estimate_s: {pe['estimate_s']}" in printed and "  placement: CPU" in printed


def test_the_scanned_document_lengths_and_a_drawn_split_set_the_tokens_scored():
    """Not drawn yet: the budget in documents of the kind's mean length (at most data.seq_length) up to
    eval.max_docs; drawn: the split's own counts."""
    from cglab.train.eval_cost import text_tokens

    cfg = load_config(ONE_GPU_1B, ["eval.every=100", "eval.max_docs=300"])
    sources = [{"kind": "pile", "tokens_per_document": 100.0}, {"kind": "stack", "tokens_per_document": 5000.0}]
    # NL: 32,768 / 100 -> 328 documents, capped at 300; code: documents cut at 2048 -> 16
    assert text_tokens(cfg, sources) == {"nl": 300 * 100, "code": 16 * 2048, "infill": 16 * 2048}
    drawn = {"nl": {"documents": 10, "tokens": 5000}, "code": {"documents": 4, "tokens": 6000}, "duplicates": 0}
    assert text_tokens(cfg, sources, drawn) == {"nl": 5000, "code": 6000, "infill": 4 * 2048}


def test_the_code_part_and_fewer_scored_documents_change_the_estimate():
    """eval.score_docs=4 scores 4 documents per kind; eval.code_every adds pass@1's generation and sandbox;
    two task CPUs halve the model time."""
    from cglab.train import eval_cost as ec

    pe = _plan("eval.every=100", "eval.code_every=100", "eval.score_docs=4", "eval.task_cpus=2")["periodic_eval"]
    n = _plan()["budget"]["parameters"]["total"]
    assert pe["text_tokens"] == {"nl": 4 * 2048, "code": 4 * 2048, "infill": 4 * 2048}
    text = 3 * 4 * 2048 * (ec.TEXT_S_PER_TOKEN + ec.TEXT_S_PER_PARAM_TOKEN * n) / 2
    gen = 2 * 8 * 128  # two suites x eval.code_limit x eval.max_new_tokens
    code = gen * (ec.GEN_S_PER_TOKEN + ec.GEN_S_PER_PARAM_TOKEN * n) / 2 + 2 * 8 * ec.SANDBOX_S_PER_PROGRAM
    assert pe["generated_tokens"] == gen and pe["estimate_s"] == round(text + code, 1)


def test_a_cpu_run_has_no_interval_and_a_run_without_periodic_evaluation_no_section():
    from cglab.plan import plan_run

    pe = plan_run(load_config(REPO / "jobs" / "configs" / "tiny_cpu.yaml", ["eval.code_every=10"]))["periodic_eval"]
    assert pe["enabled"] and pe["interval_s"].startswith("unknown") and "end_wait_gpu_hours" not in pe
    assert _plan()["periodic_eval"] == {"enabled": False}


def test_eval_end_wait_s_overrides_the_planned_bound_and_is_validated():
    pe = _plan("eval.every=100", "eval.end_wait_s=300")["periodic_eval"]
    assert pe["end_wait_s"] == 300.0 and pe["end_wait_from"] == "eval.end_wait_s"
    for bad in ("0", "-5"):
        with pytest.raises(ConfigError, match=r"eval\.end_wait_s"):
            load_config(ONE_GPU_1B, [f"eval.end_wait_s={bad}"])


@pytest.mark.parametrize("overrides", [("eval.every=100",), ("eval.every=100", "eval.end_wait_s=300")])
def test_the_callback_waits_the_planned_bound(overrides):
    """fit hands the plan's bound to every worker (WorkerInputs.eval_end_wait_s, from the same plan it logs as
    plan.json); the callback's end wait is that number."""
    from cglab.eval.periodic import end_wait
    from cglab.train.trainer import worker_end_wait

    plan = _plan(*overrides)
    assert end_wait(SimpleNamespace(eval_end_wait_s=worker_end_wait(plan))) == plan["periodic_eval"]["end_wait_s"]
    with pytest.raises(ValueError, match="eval_end_wait_s"):
        end_wait(SimpleNamespace(eval_end_wait_s=None))
