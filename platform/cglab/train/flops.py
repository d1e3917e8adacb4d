"""Model FLOPs and MFU, by the same formula as design.md §3 (and the benchmarks)."""

from __future__ import annotations

import torch

from cglab.config import ModelConfig

# Dense bf16 tensor-core peaks from the datasheets, TFLOP/s (no sparsity). MFU against these is the number Megatron
# and torchtitan publish, and cglab's one MFU (`mfu`); benchmarks/ also print the fraction of a matmul peak measured
# in the same run, as a second, separately named column.
PEAK_BF16_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "L40S": 362.0, "A10G": 125.0}


def flops_per_token(m: ModelConfig, seq_len: int) -> float:
    """Training FLOPs per token: 6·(12·L·d² + V·d) + 12·L·d·S (forward + backward, attention scores included)."""
    L, d, V = m.num_layers, m.hidden_size, m.vocab_size
    return 6 * (12 * L * d * d + V * d) + 12 * L * d * seq_len


def device_peak_tflops() -> float | None:
    if not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name()
    for key, peak in PEAK_BF16_TFLOPS.items():
        if key in name:
            return peak
    return None


def model_tflops(tokens_per_s: float, m: ModelConfig, seq_len: int, num_gpus: int = 1) -> float:
    """Model TFLOP/s per GPU: tokens/s of the whole job x flops_per_token / GPUs."""
    return tokens_per_s * flops_per_token(m, seq_len) / num_gpus / 1e12


def mfu(
    tokens_per_s: float, m: ModelConfig, seq_len: int, num_gpus: int = 1, peak_tflops: float | None = None
) -> float | None:
    """Model FLOPs utilisation, cglab's one definition (the live `mfu` metric, the benchmark tables, the README):
    model FLOP/s per GPU (`flops_per_token`, design.md §3) over the datasheet dense bf16 tensor-core peak
    (`PEAK_BF16_TFLOPS`: 989 TFLOP/s on an H100 SXM), as Megatron and torchtitan report it. peak_tflops: the
    datasheet peak in TFLOP/s; None looks this machine's GPU up (`device_peak_tflops`). None when no peak is known
    (CPU, an unlisted GPU): a utilisation against a guessed peak would be a wrong number, not a rough one."""
    if peak_tflops is None:
        peak_tflops = device_peak_tflops()
    if peak_tflops is None:
        return None
    return model_tflops(tokens_per_s, m, seq_len, num_gpus) / peak_tflops
