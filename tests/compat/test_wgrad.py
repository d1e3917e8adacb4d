"""The gradient-accumulation shim adds exactly the weight gradient into main_grad, through Megatron's own linear
layers with gradient_accumulation_fusion=True."""

import pytest
import torch

from cglab.compat import wgrad as megatron_wgrad


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_accumulates_grad_output_t_times_input(dtype):
    g = torch.Generator().manual_seed(0)
    x, dy = torch.randn(13, 6, generator=g).to(dtype), torch.randn(13, 4, generator=g).to(dtype)
    start = torch.randn(4, 6, generator=g)
    main = start.clone()
    megatron_wgrad.wgrad_gemm_accum_fp32(x, dy, main)
    assert main.dtype == torch.float32
    tol = 1e-6 if dtype == torch.float32 else 1e-2
    torch.testing.assert_close(main, start + dy.float().t() @ x.float(), rtol=tol, atol=tol)
    half = start.to(torch.bfloat16)
    megatron_wgrad.wgrad_gemm_accum_fp16(x.to(torch.bfloat16), dy.to(torch.bfloat16), half)
    torch.testing.assert_close(half.float(), start + dy.float().t() @ x.float(), rtol=5e-2, atol=5e-2)


def test_apply_is_idempotent_and_installs_the_shim():
    from megatron.core.tensor_parallel import layers

    assert megatron_wgrad.apply() is True and megatron_wgrad.apply() is True
    assert layers.fused_weight_gradient_mlp_cuda is megatron_wgrad.SHIM and layers._grad_accum_fusion_available


@pytest.mark.parametrize("kind", ["column", "row"])
def test_megatron_linear_with_fusion_accumulates_into_main_grad(single_rank, kind):
    """Two backward passes through a Megatron linear layer with the fusion on leave main_grad = start + both weight
    gradients (as the unfused layer's .grad says), and no .grad of their own."""
    from megatron.core import tensor_parallel
    from megatron.core.transformer.transformer_config import TransformerConfig

    megatron_wgrad.apply()
    layers = {}
    for fused in (True, False):
        tc = TransformerConfig(
            num_layers=1,
            hidden_size=8,
            num_attention_heads=1,
            use_cpu_initialization=True,
            gradient_accumulation_fusion=fused,
        )
        cls = tensor_parallel.ColumnParallelLinear if kind == "column" else tensor_parallel.RowParallelLinear
        extra = {"gather_output": False} if kind == "column" else {"input_is_parallel": True}
        torch.manual_seed(0)
        layers[fused] = cls(8, 5, config=tc, init_method=torch.nn.init.normal_, bias=True, skip_bias_add=False, **extra)
    fused, plain = layers[True], layers[False]
    start = torch.randn(5, 8)
    fused.weight.main_grad = start.clone()
    g = torch.Generator().manual_seed(1)
    for _ in range(2):
        x = torch.randn(3, 2, 8, generator=g)
        for layer in (fused, plain):
            out, _ = layer(x.clone().requires_grad_())
            out.pow(2).sum().backward()
    assert fused.weight.grad is None
    torch.testing.assert_close(fused.weight.main_grad, start + plain.weight.grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(fused.bias.grad, plain.bias.grad)
