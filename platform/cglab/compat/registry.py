"""Every name of Megatron-Core, torch, MLflow and Ray that cglab patches or reads privately, with why and how to undo.

A patch is written against one version of the library it patches. `TESTED` names those versions (pyproject.toml
pins them); `check_versions` refuses any other unless told to go ahead (CGLAB_ALLOW_UNTESTED_VERSIONS=1, or
allow_untested=True), and tests/compat/test_registry.py resolves every target below in the installed versions.

A target is "module:attr.path" (an attribute that must exist) or "module:#text" (text the module's source must
contain: instance attributes, keyword arguments and thread names that exist only at run time).
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass

import torch

TESTED = {"megatron-core": "0.16.1", "torch": "2.13.0"}
ALLOW_ENV = "CGLAB_ALLOW_UNTESTED_VERSIONS"


class UntestedVersionError(RuntimeError):
    """A patched library is at a version the patches were not written for."""


@dataclass(frozen=True)
class Patch:
    name: str  # the key cglab.compat.apply takes; "" for names only read
    module: str  # cglab's module holding the code
    targets: tuple[str, ...]  # what it replaces (or reads)
    when: str  # under which condition it is active
    reason: str
    undo: str


_CLIP = "megatron.core.optimizer.clip_grads"
_OPT = "megatron.core.optimizer.optimizer"
_DOPT = "megatron.core.optimizer.distrib_optimizer"

PATCHES: tuple[Patch, ...] = (
    Patch(
        "cpu",
        "cglab.compat.cpu",
        (
            "torch.cuda:current_device",
            "torch.cuda:get_rng_state",
            "torch.cuda:set_rng_state",
            "torch.cuda.random:get_rng_state",
            "torch.cuda.random:set_rng_state",
            "torch.cuda:manual_seed",
            "torch.cuda:manual_seed_all",
            "torch.cuda:synchronize",
            "megatron.core.tensor_parallel.random:_get_cuda_rng_state",
            "megatron.core.tensor_parallel.random:_set_cuda_rng_state",
            *(
                f"{m}:torch"
                for m in (
                    "megatron.core.pipeline_parallel.schedules",
                    _OPT,
                    _CLIP,
                    "megatron.core.optimizer.grad_scaler",
                    "megatron.core.distributed.param_and_grad_buffer",
                    "megatron.core.utils",
                )
            ),
            f"{_CLIP}:clip_grad_by_total_norm_fp32",
            f"{_OPT}:clip_grad_by_total_norm_fp32",
            f"{_CLIP}:multi_tensor_applier",
            f"{_CLIP}:multi_tensor_scale_impl",
        ),
        "no CUDA (called by cglab.distributed.init_parallel; a GPU process is never touched)",
        'Megatron-Core assumes CUDA for the current device, its RNG tracker\'s state and the device="cuda" '
        "bookkeeping tensors of its schedules and optimizer; development machines and CI have no GPU",
        "none in-process: the patches stay for the life of the process (a fresh process is unpatched)",
    ),
    Patch(
        "foreach",
        "cglab.compat.foreach",
        (
            f"{_CLIP}:l2_norm_impl",
            f"{_CLIP}:multi_tensor_scale_impl",
            f"{_OPT}:multi_tensor_scale_impl",
            "megatron.core.utils:local_multi_tensor_l2_norm",
            "megatron.core.utils:local_multi_tensor_scale",
        ),
        "neither Apex nor Transformer Engine installed (Megatron chose its local per-tensor fallbacks)",
        "the local fallbacks sync the device once per parameter per step; torch's foreach kernels do not",
        "set the three *_impl names back to megatron.core.utils.local_multi_tensor_l2_norm / _scale",
    ),
    Patch(
        "wgrad",
        "cglab.compat.wgrad",
        (
            "megatron.core.tensor_parallel.layers:_grad_accum_fusion_available",
            "megatron.core.tensor_parallel.layers:#fused_weight_gradient_mlp_cuda.wgrad_gemm_accum_fp32",
            "megatron.core.tensor_parallel.layers:#fused_weight_gradient_mlp_cuda.wgrad_gemm_accum_fp16",
            "torch:addmm",
        ),
        "model.wgrad_fusion on CUDA, Apex's fused_weight_gradient_mlp_cuda absent",
        "gradient_accumulation_fusion needs Apex's extension; cuBLAS addmm with out_dtype=float32 does the same",
        "delete layers.fused_weight_gradient_mlp_cuda and set layers._grad_accum_fusion_available = False",
    ),
    Patch(
        "gradscale",
        "cglab.compat.gradscale",
        (
            "megatron.core.distributed:DistributedDataParallel.scale_gradients",
            "megatron.core.optimizer:MegatronOptimizer.prepare_grads",
            "megatron.core.optimizer:MegatronOptimizer.get_grad_norm",
            "megatron.core.optimizer:MegatronOptimizer.step_with_ready_grads",
            "megatron.core.optimizer:MegatronOptimizer.get_parameters",
            f"{_OPT}:#self.optimizer = optimizer",
            f"{_OPT}:#self.chained_optimizers = ",
            'torch.optim.adam:#getattr(self, "grad_scale", None)',
        ),
        "train.fold_grad_scale in effect (per model chunk and optimizer, from cglab.compat.apply_to_optimizer)",
        "the per-token 1/num_tokens factor and the clip are two passes over the fp32 grads each step; fused "
        "AdamW takes one scalar grad scale for free",
        "delete the chunks' scale_gradients instance attribute and call optimizer.step() instead of "
        "cglab.compat.gradscale.step",
    ),
    Patch(
        "fused_adam",
        "cglab.compat.adam",
        (
            "megatron.core.optimizer:USING_PYTORCH_OPTIMIZER",
            "megatron.core.optimizer:Adam",
            "torch.optim.adam:#fused",
            "torch.optim.adam:#foreach",
        ),
        "the run's Adam is torch's AdamW and train.fused_adam applies (cglab.decisions)",
        "Megatron builds torch AdamW in foreach mode; the fused kernel is one launch and takes a grad scale",
        'set each param group\'s "fused" to False and "foreach" to True',
    ),
    # Read, not patched: private names other modules of cglab rely on.
    Patch(
        "",
        "cglab.compat.mainparams",
        (
            f"{_OPT}:#self.float16_groups = []",
            f"{_OPT}:#self.fp32_from_float16_groups = []",
            f"{_DOPT}:#self.model_float16_groups,",
            f"{_DOPT}:#self.shard_fp32_from_float16_groups,",
            f"{_DOPT}:DistributedOptimizer._get_model_param_range_map",
        ),
        "model.init_from in a bf16 run (cglab.train.step.build_train_state)",
        "Megatron builds the fp32 main params from the bf16 ones; the weights' fp32 values are written over them",
        "drop the seed_main_params call (the main params then start as the bf16 rounding of the weights)",
    ),
    Patch(
        "",
        "cglab.train.pretrained",
        (
            f"{_OPT}:#prefix=f'optimizer.state.fp32_param'",
            f'{_DOPT}:#tensors["fp32_param"] = tensors.pop("param")',
            f"{_DOPT}:#prefix = 'optimizer.state'",
        ),
        "model.init_from names a checkpoint of a bf16 run",
        "the fp32 main params are read from the checkpoint's optimizer state, under the key both Megatron "
        "optimizers (Float16, Distributed in its default fully_sharded_model_space format) write them",
        "read the checkpoint's model weights only (bf16 there)",
    ),
    Patch(
        "",
        "cglab.train.checkpoint_writes",
        (
            "megatron.core.dist_checkpointing.strategies.async_utils:AsyncCallsQueue",
            "megatron.core.dist_checkpointing.strategies.async_utils:#self.async_calls: deque",
            "megatron.core.dist_checkpointing.strategies.async_utils:TemporalAsyncCaller.close",
            "megatron.core.dist_checkpointing.strategies.async_utils:#self.process: Optional[mp.Process]",
        ),
        "train.async_save, when a step raised with a checkpoint write in flight (Checkpointer.on_end)",
        "AsyncCallsQueue.close(abort=True) kills only the persistent worker; each forked writer of the queue's "
        "pending calls is killed and reaped here, so an aborted write never reaches its finalize (COMPLETE)",
        "call queue.close() (it waits for the write and finalizes it, collectively)",
    ),
    Patch(
        "",
        "cglab.track.mlflow_logger",
        (
            "mlflow.system_metrics.system_metrics_monitor:SystemMetricsMonitor",
            "mlflow.system_metrics.system_metrics_monitor:#self._logging_step",
            "mlflow.system_metrics.system_metrics_monitor:#self._shutdown_event",
            "mlflow.system_metrics.system_metrics_monitor:#self._process",
            "mlflow.system_metrics.system_metrics_monitor:SystemMetricsMonitor.collect_metrics",
            "mlflow.system_metrics.system_metrics_monitor:SystemMetricsMonitor.aggregate_metrics",
            "mlflow.system_metrics.system_metrics_monitor:SystemMetricsMonitor.publish_metrics",
        ),
        "track.system_metrics on",
        "SystemMetricsMonitor.finish() joins without a timeout and retries for minutes when the server is away",
        "call monitor.finish() instead",
    ),
    Patch(
        "",
        "cglab",
        ("megatron.core.jit:jit_fuser", "megatron.core.jit:#jit_fuser = torch.compile"),
        "a process without CUDA, from its first `import cglab` (before Megatron-Core's import)",
        "jit_fuser is torch.compile, which imports TorchDynamo and Inductor (~1.7 CPU-s) in every process the "
        "moment Megatron-Core's fused functions are decorated; deferred to a function's first call, which no CPU run "
        "makes",
        "remove _DeferMegatronCompile from cglab/__init__.py",
    ),
    Patch(
        "",
        "cglab.raylocal",
        (
            "ray:init",
            'ray._private.worker:#kwargs.pop("_temp_dir"',
            'ray.data._internal.execution.streaming_executor:#f"StreamingExecutor-',
            'ray.data._internal.block_batching.util:#name="iter_threaded"',
            'ray.data._internal.util:#name=f"map_tp_',
        ),
        "a private local Ray (tests, cglab demo, cglab data inspect)",
        "ray.shutdown() under a live Ray Data thread ends the process with _Exit(1); these thread names are "
        "what raylocal.quiesce waits for",
        "drop the wait (and _temp_dir: Ray's default temp dir)",
    ),
)


def installed_versions() -> dict[str, str]:
    """The release versions of the patched libraries in this process ("2.13.0+cu130" -> "2.13.0")."""
    # Megatron (seconds to import): loaded when a patch runs, not when cglab.decisions imports compat
    import megatron.core

    return {"megatron-core": megatron.core.__version__, "torch": torch.__version__.split("+")[0]}


_WARNED: set[tuple] = set()


def check_versions(allow_untested: bool | None = None) -> dict[str, str]:
    """The installed versions, or UntestedVersionError when one differs from TESTED. allow_untested (None: the
    CGLAB_ALLOW_UNTESTED_VERSIONS environment variable, "1" to allow) turns the refusal into a warning."""
    have = installed_versions()
    off = {k: v for k, v in have.items() if v != TESTED[k]}
    if not off:
        return have
    if allow_untested is None:
        allow_untested = os.environ.get(ALLOW_ENV, "") == "1"
    what = ", ".join(f"{k} {v} (patches written for {TESTED[k]})" for k, v in sorted(off.items()))
    if not allow_untested:
        raise UntestedVersionError(
            f"cglab.compat: untested versions: {what}. cglab patches these libraries' internals "
            f"(cglab/compat/registry.py); run tests/compat against this version, then add it to TESTED, or set "
            f"{ALLOW_ENV}=1 to run anyway"
        )
    key = tuple(sorted(off.items()))
    if key not in _WARNED:
        _WARNED.add(key)
        warnings.warn(f"cglab.compat: running with untested versions ({ALLOW_ENV}=1): {what}", stacklevel=2)
    return have
