"""Memory per GPU of a training run, on paper: weights, gradients, optimizer state and activations.

What Megatron-Core holds on the busiest rank of a TP x PP x DP run as cglab builds it (cglab.train.step):
- weights: the rank's parameters (its pipeline stage's layers, sharded by TP; the embedding on the first stage,
  the LM head with its bias on the last) in the run's precision (2 bytes bf16, 4 fp32);
- gradients: Megatron DDP's fp32 main-grad buffer (`grad_reduce_in_fp32=True`), 4 bytes per parameter, whole
  even with the distributed optimizer (it reduce-scatters into the same buffer);
- optimizer: Adam's fp32 exp_avg and exp_avg_sq, plus fp32 main params under bf16 (12 or 8 bytes per parameter),
  divided by DP with the distributed optimizer (ZeRO-1);
- activations: per layer and micro-batch s*b*h*(10 + 24/t) bytes at 16 bits (Korthikanti et al. 2022, "Reducing
  Activation Recomputation in Large Transformer Models", Table 2, no sequence parallelism, no recomputation), plus
  5*a*s^2*b/t where attention scores are materialised (Megatron's unfused `local` attention); the first pipeline
  stage holds min(PP, micro-batches per step) micro-batches in flight under 1F1B;
- logits: s*b*V/t on the last stage, kept in the compute dtype plus an fp32 copy and its fp32 gradient for the
  loss (10 bytes per element at bf16).
Not counted: the CUDA context and allocator slack (~1-3 GB), communication buffers, torch.compile workspaces.
"""

from __future__ import annotations

import math

from cglab.config import CGLabConfig

GIB = float(1 << 30)


def layer_params(d: int, ffn: int) -> int:
    """One CodeGen block: LayerNorm (2d), bias-free qkv (3d^2) and output (d^2), MLP with biases (2 d ffn + ffn + d)."""
    return 2 * d + 4 * d * d + 2 * d * ffn + ffn + d


def stage_params(cfg: CGLabConfig) -> dict[str, int]:
    """Parameters on one rank of the first and of the last pipeline stage (TP-sharded)."""
    m, p = cfg.model, cfg.parallel
    tp, pp = p.tensor_model_parallel_size, p.pipeline_model_parallel_size
    d, V = m.hidden_size, m.vocab_size
    per_stage = math.ceil(m.num_layers / pp) * layer_params(d, m.ffn_size) // tp
    embed, head = V * d // tp, (V * d + V) // tp + 2 * d  # the final LayerNorm sits with the head
    if pp == 1:
        return {"first": per_stage + embed + head, "last": per_stage + embed + head}
    return {"first": per_stage + embed, "last": per_stage + head}


def memory_gib(cfg: CGLabConfig, attention_backend: str) -> dict:
    """Estimated GiB on the busiest rank, by component, and the total (see the module docstring)."""
    m, p, t = cfg.model, cfg.parallel, cfg.train
    tp, pp, dp = p.tensor_model_parallel_size, p.pipeline_model_parallel_size, p.data_parallel_size
    s, b, h, a, V = cfg.data.seq_length, t.micro_batch_size, m.hidden_size, m.num_attention_heads, m.vocab_size
    bf16 = t.precision == "bf16"
    act_bytes = 2 if bf16 else 4
    params = stage_params(cfg)
    n_micro = t.global_batch_size // (t.micro_batch_size * dp)
    layers = math.ceil(m.num_layers / pp)
    per_layer = s * b * h * (10 + 24 / tp) * act_bytes / 2
    if attention_backend == "local":
        per_layer += 5 * a * s * s * b / tp * act_bytes / 2
    in_flight = min(pp, n_micro)
    logits = s * b * V / tp * (act_bytes + 8)

    def total_for(stage: str) -> dict[str, float]:
        n = params[stage]
        opt = n * (12 if bf16 else 8) / (dp if p.distributed_optimizer else 1)
        acts = layers * per_layer * (in_flight if stage == "first" else 1)
        parts = {
            "weights": n * (2 if bf16 else 4),
            "grads": n * 4,
            "optimizer": opt,
            "activations": acts,
            "logits": logits if stage == "last" else 0.0,
        }
        return {k: v / GIB for k, v in parts.items()}

    stages = {k: total_for(k) for k in ("first", "last")}
    busiest = max(stages, key=lambda k: sum(stages[k].values()))
    out = {k: round(v, 3) for k, v in stages[busiest].items()}
    out["total"] = round(sum(stages[busiest].values()), 3)
    out.update(
        unit="GiB",
        stage=busiest if pp > 1 else "only",
        params_per_gpu=params[busiest],
        micro_batches_in_flight=in_flight if busiest == "first" else 1,
        method="Megatron-Core states (bf16 weights, fp32 main grads, fp32 Adam + main params, ZeRO-1 with "
        "the distributed optimizer) + activations by Korthikanti et al. 2022; excludes the CUDA "
        "context and allocator slack",
    )
    return out
