"""A run's size and compute budget on paper: parameters, tokens per parameter, expected tokens/s and GPU-hours.

    budget(cfg) -> {"parameters": ..., "tokens": ..., "tokens_per_parameter": ..., "tokens_per_s": ..., ...}

An estimate, not a measurement: the expected throughput assumes every GPU of the run reaches the MFU measured for
the codegen2-1B shape on one H100 (ANCHOR: benchmarks/results/train_throughput_h100.txt, design.md §3), with two
known costs that anchor did not pay taken off: the 1F1B pipeline bubble, (PP - 1) of m + PP - 1 micro-batch slots
idle (Narayanan et al. 2021), and full recomputation's second forward pass, 8 units of work for the 6 the model
FLOPs count (Korthikanti et al. 2022; selective recomputation's attention-score recompute is not counted).
Tensor- and data-parallel communication is assumed hidden, as the anchor had none to hide: the numbers are
upper-end until a device measurement of the layout replaces them.
"""

from __future__ import annotations

from cglab.config import CGLabConfig, ModelConfig
from cglab.train.flops import PEAK_BF16_TFLOPS, flops_per_token, mfu
from cglab.train.memory import layer_params

# The measured anchor: codegen2-1B shape on one H100 80GB, bf16, seq 2048, micro-batch 4 x 8 micro-batches per
# step, cglab's defaults (run 3 at 34d7720, case cglab-fold-codegen2-1B-mb4x8).
ANCHOR = {
    "preset": "codegen2-1B",
    "seq_length": 2048,
    "tokens_per_s": 85_022,
    "gpu": "H100",
    "source": "benchmarks/results/train_throughput_h100.txt, run 3 (34d7720), cglab-fold-codegen2-1B-mb4x8",
}
GPU = "H100"  # the GPU the GPU presets are sized for (cglab.train.plan.GPU_MEMORY_GIB)


def parameters(m: ModelConfig) -> dict[str, int]:
    """All weights (embedding, every block, the final LayerNorm, the untied LM head with its bias), and the
    non-embedding count (without the embedding and the LM head), as Kaplan et al. 2020 count N."""
    d, V = m.hidden_size, m.vocab_size
    blocks = m.num_layers * layer_params(d, m.ffn_size) + 2 * d
    return {"total": blocks + V * d + V * d + V, "non_embedding": blocks}


def anchor_mfu() -> float:
    """The anchor's MFU by cglab's one definition (model FLOPs over the datasheet dense bf16 peak)."""
    m = ModelConfig(preset=ANCHOR["preset"])
    return mfu(ANCHOR["tokens_per_s"], m, ANCHOR["seq_length"], 1, PEAK_BF16_TFLOPS[ANCHOR["gpu"]])


def budget(cfg: CGLabConfig, recompute: str = "none") -> dict:
    """The run's parameters, tokens, tokens per parameter and, on GPU, its expected tokens/s and GPU-hours (see the
    module docstring). recompute: the run's resolved granularity (none | selective | full)."""
    m, t, S = cfg.model, cfg.train, cfg.data.seq_length
    n = parameters(m)
    tokens = t.train_steps * t.global_batch_size * S
    out = {
        "parameters": n,
        "parameters_counted": "total: every weight incl. the embedding and the untied LM head (with its bias); "
        "non_embedding: without the embedding and the LM head",
        "tokens": tokens,
        "tokens_per_parameter": round(tokens / n["total"], 2),
    }
    if not cfg.parallel.use_gpu:
        return {**out, "tokens_per_s": None, "gpu_hours": None, "note": "CPU run: no GPU estimate"}
    pp, world = cfg.parallel.pipeline_model_parallel_size, cfg.world_size
    micro = t.global_batch_size // (t.micro_batch_size * cfg.parallel.data_parallel_size)
    assumed = anchor_mfu() * micro / (micro + pp - 1) * (6 / 8 if recompute == "full" else 1.0)
    fpt = flops_per_token(m, S)
    tokens_per_s = assumed * PEAK_BF16_TFLOPS[GPU] * 1e12 * world / fpt
    return {
        **out,
        "flops_per_token": fpt,
        "assumed_mfu": round(assumed, 4),
        "tokens_per_s": round(tokens_per_s),
        "gpu_hours": round(tokens / tokens_per_s * world / 3600, 1),
        "hours": round(tokens / tokens_per_s / 3600, 2),
        "method": f"ESTIMATE, not measured on this layout: each of {world} {GPU}s at the MFU measured for "
        f"{ANCHOR['preset']} on one {ANCHOR['gpu']} ({anchor_mfu():.1%} of {PEAK_BF16_TFLOPS[GPU]:g} TFLOP/s, "
        f"{ANCHOR['source']}), less the 1F1B bubble and full recomputation's extra forward; communication "
        "assumed hidden; model FLOPs per token 6(12 L d^2 + V d) + 12 L d S",
    }
