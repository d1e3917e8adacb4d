"""The memory plan (cglab.train.memory) against the published formulas, stage by stage: model states of 2 (bf16
weights) + 4 (fp32 main grads) + 12/DP (fp32 Adam moments and main params, sharded by the distributed optimizer)
bytes per parameter, and per layer and micro-batch s*b*h*(10 + 24/t) bytes of activations at 16 bits (34/t with
sequence parallelism), plus 5*a*s^2*b/t for materialised attention scores (Korthikanti et al. 2022, Table 2),
2*s*b*h (/t with sequence parallelism) under full recomputation; stage i of PP holds min(PP - i, micro-batches)
micro-batches in flight (1F1B)."""

import pytest

from cglab.config import from_dict
from cglab.decisions import Recompute
from cglab.train.memory import activation_bytes, memory_gib

GIB = 2**30
D16, L16, V = 6144, 34, 51200
LAYER16 = 12 * D16 * D16 + 7 * D16  # one CodeGen block: 4d^2 attention + 8d^2 MLP, 7d of biases and LayerNorm
# TP=8 x PP=4 x DP=2 (64 GPUs), bf16, distributed optimizer, seq 2048, micro-batch 1 (tests/test_plan.py too)
CODEGEN2_16B_64GPUS = [
    "model.preset=codegen2-16B",
    "parallel.tensor_model_parallel_size=8",
    "parallel.pipeline_model_parallel_size=4",
    "parallel.data_parallel_size=2",
    "parallel.use_gpu=true",
    "parallel.distributed_optimizer=true",
    "train.precision=bf16",
    "data.seq_length=2048",
    "data.num_sentinels=256",
    "train.micro_batch_size=1",
    "train.global_batch_size=64",
]
AUTO_STAGES = ["parallel.num_layers_in_first_pipeline_stage=auto", "parallel.num_layers_in_last_pipeline_stage=auto"]


def test_codegen2_16b_on_64_gpus_with_uneven_stages():
    """TP=8 x PP=4 x DP=2, 34 layers as 8/9/9/8: every stage by the formulas, the busiest reported."""
    cfg = from_dict({}, CODEGEN2_16B_64GPUS + AUTO_STAGES)
    assert cfg.pipeline_stages == (8, 9, 9, 8)
    assert L16 * LAYER16 + 2 * V * D16 + V + 2 * D16 == pytest.approx(16.0e9, rel=0.01)  # it is the 16B model
    act_layer = 2048 * 1 * D16 * (10 + 24 / 8)  # bytes, bf16
    params = [
        8 * LAYER16 // 8 + V * D16 // 8,  # the embedding on the first stage
        9 * LAYER16 // 8,
        9 * LAYER16 // 8,
        8 * LAYER16 // 8 + (V * D16 + V) // 8 + 2 * D16,  # the head and the final LayerNorm on the last
    ]
    logits = 2048 * V / 8 * (2 + 8)
    want = [
        (n * (2 + 4 + 12 / 2) + layers * act_layer * min(4 - i, 32) + (logits if i == 3 else 0)) / GIB
        for i, (n, layers) in enumerate(zip(params, cfg.pipeline_stages))
    ]
    mem = memory_gib(cfg, "flex")
    assert mem["per_stage_total"] == pytest.approx(want, abs=0.005)
    busiest = max(range(4), key=want.__getitem__)
    assert (mem["pp_rank"], mem["layers"], mem["params_per_gpu"]) == (busiest, (8, 9, 9, 8)[busiest], params[busiest])
    assert mem["total"] == pytest.approx(want[busiest], abs=0.005) and mem["total"] < 80


def test_an_unsplittable_layout_is_still_estimated_at_ceil_layers_per_stage():
    """PP=4 with no first/last counts: refused by the config check, estimated with 9 layers on every stage."""
    cfg = from_dict({}, CODEGEN2_16B_64GPUS, cross_field=False)
    mem = memory_gib(cfg, "flex")
    assert mem["layers"] == 9 and mem["stage"] == "first"
    assert mem["params_per_gpu"] == 9 * LAYER16 // 8 + V * D16 // 8


@pytest.mark.parametrize("backend", ["flex", "local"])
def test_recomputation_activations(backend):
    """codegen2-7B (32 layers, d=4096, 16 heads) at TP=2 x PP=2, micro-batch 2, 8 micro-batches per step: the first
    stage's 16 layers with 2 micro-batches in flight, per recomputation setting."""
    base = [
        "model.preset=codegen2-7B",
        "parallel.tensor_model_parallel_size=2",
        "parallel.pipeline_model_parallel_size=2",
        "parallel.use_gpu=true",
        "train.precision=bf16",
        "data.seq_length=2048",
        "data.num_sentinels=256",
        "train.micro_batch_size=2",
        "train.global_batch_size=16",
        f"model.attention_backend={backend}",
        "model.document_masking=false",  # flex with full recompute needs no mask then
    ]
    s, b, h, a, t, layers, flight = 2048, 2, 4096, 16, 2, 16, 2
    kept = s * b * h * (10 + 24 / t)
    scores = 5 * a * s * s * b / t if backend == "local" else 0
    full = kept + scores

    def acts(*overrides):  # the first stage's (with the last's logits the last stage can be the busiest)
        cfg = from_dict({}, base + list(overrides))
        return activation_bytes(cfg, Recompute.resolve(cfg.model, 16), layers, flight, backend)

    assert acts() == pytest.approx(layers * full * flight, rel=1e-4)
    assert acts("model.recompute=selective") == pytest.approx(layers * kept * flight, rel=1e-4)
    inp = 2 * s * b * h  # a layer's input, kept in bf16
    assert acts("model.recompute=full") == pytest.approx(layers * inp * flight + full, rel=1e-4)
    uniform4 = acts("model.recompute=full", "model.recompute_num_layers=4")
    assert uniform4 == pytest.approx(4 * inp * flight + 4 * full, rel=1e-4)
    block = acts("model.recompute=full", "model.recompute_method=block", "model.recompute_num_layers=10")
    assert block == pytest.approx((10 * inp + 6 * full) * flight + full, rel=1e-4)
    assert acts("model.recompute=full") < block < acts()
    # sequence parallelism splits the per-token part (10) over TP too: 34/t per layer (Korthikanti Table 2), and a
    # full-recompute layer's kept input is a sequence shard
    sp = "parallel.sequence_parallel=true"
    assert acts(sp) == pytest.approx(layers * (s * b * h * 34 / t + scores) * flight, rel=1e-4)
    assert acts(sp, "model.recompute=selective") == pytest.approx(layers * s * b * h * 34 / t * flight, rel=1e-4)
    sp_full = s * b * h * 34 / t + scores
    assert acts(sp, "model.recompute=full") == pytest.approx(layers * inp / t * flight + sp_full, rel=1e-4)
    with_sp, without = (memory_gib(from_dict({}, o), backend) for o in ([*base, sp], base))
    assert with_sp["activations"] < without["activations"] and with_sp["sequence_parallel"]
    # the plan's estimate follows the setting on every stage
    none, full_rc = (memory_gib(from_dict({}, base + rc), backend) for rc in ([], ["model.recompute=full"]))
    assert (none["recompute"], full_rc["recompute"]) == ("none", "full")
    assert all(f < n for f, n in zip(full_rc["per_stage_total"], none["per_stage_total"]))
    # without most activations, the last stage's LM head and logits make it the busiest
    assert full_rc["stage"] == "last" and full_rc["total"] == max(full_rc["per_stage_total"])
    assert none["stage"] == "first" and none["total"] == max(none["per_stage_total"])
