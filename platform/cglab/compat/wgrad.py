"""Megatron-Core's gradient-accumulation fusion without Apex: weight gradients summed into the fp32 main_grad
inside the weight-gradient GEMM.

Without it every linear layer's backward writes a bf16 weight gradient, and Megatron's DDP hook then reads it back
with the fp32 main_grad and writes the sum (one extra pass over 12 bytes per parameter, every micro-batch). With
`gradient_accumulation_fusion` Megatron's linear layers call `fused_weight_gradient_mlp_cuda.wgrad_gemm_accum_fp32`
(an Apex extension) to accumulate in place; `apply()` gives them the same entry points on cuBLAS through
`torch.addmm(..., out_dtype=torch.float32)`, which reads bf16 operands and accumulates into an fp32 output. An Apex
installation keeps its own kernel.
"""

from __future__ import annotations

import types
import warnings

import torch

_IN_PLACE_OK: bool | None = None  # whether this torch's CUDA addmm accumulates bf16 x bf16 into fp32 in place


def wgrad_gemm_accum_fp32(total_input: torch.Tensor, grad_output: torch.Tensor, main_grad: torch.Tensor) -> None:
    """main_grad[out, in] += grad_output[n, out]^T @ total_input[n, in], accumulated in fp32 (Apex's contract)."""
    global _IN_PLACE_OK
    low = total_input.dtype in (torch.bfloat16, torch.float16)
    if main_grad.is_cuda and low and _IN_PLACE_OK is not False:
        try:
            torch.addmm(main_grad, grad_output.t(), total_input, out_dtype=torch.float32, out=main_grad)
            _IN_PLACE_OK = True
            return
        except (RuntimeError, TypeError) as e:  # an older torch: keep training, unfused
            _IN_PLACE_OK = False
            warnings.warn(
                f"cglab.compat.wgrad: fp32 in-place addmm unavailable ({e}); accumulating unfused", stacklevel=2
            )
    if low:
        main_grad.add_(grad_output.t().matmul(total_input))
    else:
        main_grad.addmm_(grad_output.t(), total_input)


def wgrad_gemm_accum_fp16(total_input: torch.Tensor, grad_output: torch.Tensor, main_grad: torch.Tensor) -> None:
    """main_grad (bf16/fp16) += grad_output^T @ total_input."""
    main_grad.addmm_(grad_output.t(), total_input)


SHIM = types.SimpleNamespace(wgrad_gemm_accum_fp32=wgrad_gemm_accum_fp32, wgrad_gemm_accum_fp16=wgrad_gemm_accum_fp16)


def apply() -> bool:
    """Let Megatron's linear layers take gradient_accumulation_fusion=True on these entry points. Call before
    building the model. Idempotent; returns True when the shim is in use (no Apex extension)."""
    # Megatron (seconds to import): loaded when a patch runs, not when cglab.decisions imports compat
    from megatron.core.tensor_parallel import layers

    current = getattr(layers, "fused_weight_gradient_mlp_cuda", None)
    if layers._grad_accum_fusion_available and current is not SHIM:
        return False  # Apex's extension is installed
    layers.fused_weight_gradient_mlp_cuda = SHIM
    layers._grad_accum_fusion_available = True
    return True
