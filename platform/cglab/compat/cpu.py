"""Make Megatron-Core run without CUDA (development machines and CI).

Megatron-Core assumes CUDA in a handful of places: the current device, the CUDA RNG state used by its RNG tracker,
and tensors created with device="cuda" in the pipeline schedules and p2p code. `apply()` redirects exactly those to
the CPU. It is idempotent and does nothing when CUDA is available, so a GPU process is never touched.
"""

from __future__ import annotations

import importlib
import types

import torch

_APPLIED = False

# Modules that build small bookkeeping tensors with a literal device="cuda" on the CPU training path (pipeline
# schedules, optimizer scalars, the grad buffer). Factories given device=torch.cuda.current_device() need no entry:
# `apply` points current_device at the CPU. tests/compat/test_registry.py scans every Megatron-Core module cglab
# imports and fails when one with a literal-"cuda" factory is neither here nor in GPU_ONLY_CUDA_FACTORIES.
CUDA_FACTORY_MODULES = (
    "megatron.core.pipeline_parallel.schedules",
    "megatron.core.optimizer.optimizer",
    "megatron.core.optimizer.clip_grads",
    "megatron.core.optimizer.grad_scaler",
    "megatron.core.distributed.param_and_grad_buffer",
    "megatron.core.utils",
)

# Literal-"cuda" factories ("module" or "module:Qualified.function") that a CPU run of cglab never reaches, and why.
GPU_ONLY_CUDA_FACTORIES = {
    "megatron.core.utils:GlobalSymmetricMemoryBuffer.__init__": "inference's NVLS symmetric memory (GPU only)",
    "megatron.core.distributed.fsdp.src.megatron_fsdp.mixed_precision": "Megatron-FSDP's FP8 path; cglab uses DDP",
    "megatron.core.fp8_utils": "FP8 parameter quantisation (Transformer Engine, GPU only)",
    "megatron.core.fusions.fused_indices_converter": "MoE token dispatch; CodeGen is dense",
    "megatron.core.transformer.moe.moe_utils": "MoE metrics; CodeGen is dense",
    "megatron.core.pipeline_parallel.hybrid_cp_schedule": "hybrid context parallelism; cglab has no CP",
    "megatron.core.rerun_state_machine": "_reduce_any runs only with the rerun state machine enabled (default off)",
    "megatron.core.tensor_parallel.data": "broadcast_data, Megatron's own data loader; cglab feeds every rank",
    "megatron.core.dist_checkpointing.strategies.state_dict_saver:verify_global_md_reuse": (
        "runs only with a cached checkpoint structure (loaded_all_plans); cglab.train.checkpoint.save passes none"
    ),
    "megatron.core.dist_checkpointing.exchange_utils": "shard exchange of the fully-parallel save/load wrappers "
    "and TensorAwareStateDict; cglab.train.checkpoint uses neither",
    "megatron.core.transformer.utils": "the default causal mask of the fused softmax; cglab's 'local' backend "
    "always hands DotProductAttention a dense mask (cglab.model.codegen.batch_mask)",
}


def _cpu_rng_state(*_args, **_kwargs) -> torch.Tensor:
    return torch.get_rng_state()


def _set_cpu_rng_state(state: torch.Tensor, *_args, **_kwargs) -> None:
    torch.set_rng_state(state)


class _CpuTorch(types.ModuleType):
    """`torch` as seen from one Megatron module: identical, except device="cuda" factories land on the CPU."""

    def __init__(self) -> None:
        super().__init__("torch")

    def __getattr__(self, name):
        return getattr(torch, name)

    @staticmethod
    def _fix(kwargs):
        dev = kwargs.get("device")
        if dev == "cuda" or (isinstance(dev, torch.device) and dev.type == "cuda"):
            kwargs["device"] = "cpu"
        return kwargs

    def zeros(self, *a, **k):
        return torch.zeros(*a, **self._fix(k))

    def ones(self, *a, **k):
        return torch.ones(*a, **self._fix(k))

    def empty(self, *a, **k):
        return torch.empty(*a, **self._fix(k))

    def tensor(self, *a, **k):
        return torch.tensor(*a, **self._fix(k))


def _clip_grad_by_total_norm(parameters, max_norm, total_norm, use_decoupled_grad=False):
    """Megatron's clip_grad_by_total_norm_fp32 minus its assertion that grads live on CUDA. The scale still goes
    through clip_grads.multi_tensor_scale_impl, looked up at call time as Megatron does, so a CPU run clips with the
    op a GPU run uses (cglab.compat.foreach.scale once installed) and tests on CPU exercise it."""
    # Megatron (seconds to import): loaded when a patch runs, not when cglab.decisions imports compat
    from megatron.core.optimizer import clip_grads

    attr = "decoupled_grad" if use_decoupled_grad else "grad"
    grads = [getattr(p, attr).detach() for p in parameters if getattr(p, attr, None) is not None]
    clip_coeff = max_norm / (total_norm + 1.0e-6)
    if grads and clip_coeff < 1.0:
        dummy_overflow_buf = torch.zeros(1, dtype=torch.int)
        clip_grads.multi_tensor_applier(
            clip_grads.multi_tensor_scale_impl, dummy_overflow_buf, [grads, grads], clip_coeff
        )


def apply() -> bool:
    """Patch Megatron-Core for CPU if (and only if) CUDA is absent. Returns True when patches are active."""
    global _APPLIED
    if torch.cuda.is_available():
        return False
    if _APPLIED:
        return True

    torch.cuda.current_device = lambda: "cpu"
    torch.cuda.get_rng_state = _cpu_rng_state
    torch.cuda.set_rng_state = _set_cpu_rng_state
    torch.cuda.random.get_rng_state = _cpu_rng_state
    torch.cuda.random.set_rng_state = _set_cpu_rng_state
    # Distinct no-op functions: torch.compile keeps one rule per torch function object and rejects duplicates.
    torch.cuda.manual_seed = lambda *a, **k: None  # the CPU seed is set by torch.manual_seed
    torch.cuda.manual_seed_all = lambda *a, **k: None
    torch.cuda.synchronize = lambda *a, **k: None

    # Megatron (seconds to import): loaded when a patch runs, not when cglab.decisions imports compat
    from megatron.core.tensor_parallel import random as mrandom

    mrandom._get_cuda_rng_state = _cpu_rng_state
    mrandom._set_cuda_rng_state = _set_cpu_rng_state

    cpu_torch = _CpuTorch()
    for name in CUDA_FACTORY_MODULES:
        importlib.import_module(name).torch = cpu_torch
    from megatron.core.optimizer import clip_grads, optimizer

    clip_grads.clip_grad_by_total_norm_fp32 = _clip_grad_by_total_norm
    optimizer.clip_grad_by_total_norm_fp32 = _clip_grad_by_total_norm
    _APPLIED = True
    return True
