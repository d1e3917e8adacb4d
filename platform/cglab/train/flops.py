"""Model FLOPs and MFU, by the same formula as design.md §3 (and the benchmarks)."""
from __future__ import annotations

import torch

from cglab.config import ModelConfig

# Dense bf16 tensor-core peaks from the datasheets, TFLOP/s. MFU against these is the conventional number;
# benchmarks/ report MFU against a matmul peak measured in the same run as well.
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
