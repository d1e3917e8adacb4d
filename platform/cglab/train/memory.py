"""Memory per GPU of a training run, on paper: weights, gradients, optimizer state and activations.

What Megatron-Core holds on the busiest rank of a TP x PP x DP run as cglab builds it (cglab.train.step):
- weights: the rank's parameters (its pipeline stage's layers, sharded by TP; the embedding on the first stage,
  the LM head with its bias on the last) in the run's precision (2 bytes bf16, 4 fp32);
- gradients: Megatron DDP's fp32 main-grad buffer (`grad_reduce_in_fp32=True`), 4 bytes per parameter, whole
  even with the distributed optimizer (it reduce-scatters into the same buffer);
- optimizer: Adam's fp32 exp_avg and exp_avg_sq, plus fp32 main params under bf16 (12 or 8 bytes per parameter),
  divided by DP with the distributed optimizer (ZeRO-1);
- activations: per layer and micro-batch s*b*h*(10 + 24/t) bytes at 16 bits (Korthikanti et al. 2022, "Reducing
  Activation Recomputation in Large Transformer Models", Table 2), s*b*h*34/t with sequence parallelism (the layer
  norms', dropouts' and residuals' 10 split over TP too), plus 5*a*s^2*b/t where attention scores are materialised
  (Megatron's unfused `local` attention) unless selective recompute drops them; with full recompute a layer keeps
  only its input, 2*s*b*h bytes (/t with sequence parallelism) (uniform: one per unit of recompute_num_layers
  layers; block: on the first recompute_num_layers layers of the stage), plus the working set of the one unit being
  recomputed in backward. Pipeline stage i (of PP) holds min(PP - i, micro-batches per step) micro-batches in flight
  under 1F1B; every stage is counted with its own layers (uneven stages included) and the busiest is reported;
- logits: s*b*V/t on the last stage, kept in the compute dtype plus an fp32 copy and its fp32 gradient for the
  loss (10 bytes per element at bf16).
Not counted: the CUDA context and allocator slack (~1-3 GB), communication buffers, torch.compile workspaces.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from cglab.config import CGLabConfig, ConfigError

if TYPE_CHECKING:
    from cglab.decisions import Recompute

GIB = float(1 << 30)


def layer_params(d: int, ffn: int) -> int:
    """One CodeGen block: LayerNorm (2d), bias-free qkv (3d^2) and output (d^2), MLP with biases (2 d ffn + ffn + d)."""
    return 2 * d + 4 * d * d + 2 * d * ffn + ffn + d


def stage_params(cfg: CGLabConfig, stages: tuple[int, ...]) -> list[int]:
    """Parameters on one rank of each pipeline stage (TP-sharded), for the layers on each stage."""
    m, tp = cfg.model, cfg.parallel.tensor_model_parallel_size
    d, V = m.hidden_size, m.vocab_size
    embed, head = V * d // tp, (V * d + V) // tp + 2 * d  # the final LayerNorm sits with the head
    layer = layer_params(d, m.ffn_size)
    last = len(stages) - 1
    return [n * layer // tp + (embed if i == 0 else 0) + (head if i == last else 0) for i, n in enumerate(stages)]


def planned_stages(cfg: CGLabConfig) -> tuple[int, ...]:
    """The layers on each pipeline stage; for a layout the config check refuses, ceil(layers / PP) on each, so the
    plan still estimates (and lists the error)."""
    try:
        return cfg.pipeline_stages
    except ConfigError:
        pp = cfg.parallel.pipeline_model_parallel_size
        return (-(-cfg.model.num_layers // pp),) * pp


def activation_bytes(cfg: CGLabConfig, rc: Recompute, layers: int, in_flight: int, attention_backend: str) -> float:
    """Activations one pipeline stage of `layers` layers keeps with `in_flight` micro-batches (see the module
    docstring), for the recomputation `rc`."""
    m, t = cfg.model, cfg.train
    tp = cfg.parallel.tensor_model_parallel_size
    s, b, h, a = cfg.data.seq_length, t.micro_batch_size, m.hidden_size, m.num_attention_heads
    unit = 2 if t.precision == "bf16" else 4  # bytes per element; Korthikanti's counts are at 2
    sp = tp if cfg.parallel.sequence_parallel else 1  # what the per-token parts are split over
    full = s * b * h * (10 / sp + 24 / tp) * unit / 2
    if attention_backend == "local" and rc.granularity != "selective":
        full += 5 * a * s * s * b / tp * unit / 2
    if rc.granularity != "full":
        return layers * full * in_flight
    kept_input = s * b * h * unit / sp
    if rc.method == "uniform":
        k = min(rc.num_layers, layers)
        return -(-layers // k) * kept_input * in_flight + k * full
    r = min(rc.num_layers, layers)
    return (r * kept_input + (layers - r) * full) * in_flight + (full if r else 0.0)


def memory_gib(cfg: CGLabConfig, attention_backend: str, recompute: Recompute | None = None) -> dict:
    """Estimated GiB on the busiest rank, by component, and the total (see the module docstring). recompute: the
    run's decision (None: as the config resolves it)."""
    m, p, t = cfg.model, cfg.parallel, cfg.train
    tp, pp, dp = p.tensor_model_parallel_size, p.pipeline_model_parallel_size, p.data_parallel_size
    s, b, V = cfg.data.seq_length, t.micro_batch_size, m.vocab_size
    bf16 = t.precision == "bf16"
    stages = planned_stages(cfg)
    if recompute is None:
        from cglab.decisions import Recompute  # imports torch: kept off `cglab --help`'s path (cglab.train.plan)

        recompute = Recompute.resolve(m, max(stages))
    rc = recompute
    params = stage_params(cfg, stages)
    n_micro = t.global_batch_size // (t.micro_batch_size * dp)
    logits = s * b * V / tp * ((2 if bf16 else 4) + 8)

    def stage_gib(i: int) -> dict[str, float]:
        n = params[i]
        parts = {
            "weights": n * (2 if bf16 else 4),
            "grads": n * 4,
            "optimizer": n * (12 if bf16 else 8) / (dp if p.use_distributed_optimizer else 1),
            "activations": activation_bytes(cfg, rc, stages[i], min(pp - i, n_micro), attention_backend),
            "logits": logits if i == pp - 1 else 0.0,
        }
        return {k: v / GIB for k, v in parts.items()}

    per_stage = [stage_gib(i) for i in range(pp)]
    busiest = max(range(pp), key=lambda i: sum(per_stage[i].values()))
    out = {k: round(v, 3) for k, v in per_stage[busiest].items()}
    out["total"] = round(sum(per_stage[busiest].values()), 3)
    out.update(
        unit="GiB",
        stage="only" if pp == 1 else "first" if busiest == 0 else "last" if busiest == pp - 1 else "middle",
        pp_rank=busiest,
        layers=stages[busiest],
        params_per_gpu=params[busiest],
        micro_batches_in_flight=min(pp - busiest, n_micro),
        recompute=rc.granularity or "none",
        sequence_parallel=p.sequence_parallel,
        per_stage_total=[round(sum(x.values()), 3) for x in per_stage],
        method="Megatron-Core states (bf16 weights, fp32 main grads, fp32 Adam + main params, ZeRO-1 with "
        "the distributed optimizer) + activations by Korthikanti et al. 2022 for the recomputation and sequence "
        "parallelism chosen; excludes the CUDA context and allocator slack",
    )
    return out
