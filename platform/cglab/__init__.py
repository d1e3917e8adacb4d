"""cglab: train CodeGen2-style code LMs on Megatron-Core under Ray, and run the CodeGen2 lesson ablations."""

import functools
import importlib.abc
import importlib.machinery
import sys

__version__ = "0.1.0"


# ------------------------------------------------------------------ Megatron-Core's import-time torch.compile, deferred
# Megatron-Core decorates its fused elementwise functions with `jit_fuser` (torch.compile) when its package is
# imported, and torch.compile imports TorchDynamo and Inductor on the spot: ~1.7 CPU-s in every process that
# imports Megatron-Core (each Ray Train worker, Tune trial, evaluation and driver; benchmarks/process_start.py) for
# functions a CPU run never calls. On a host without CUDA, `jit_fuser` becomes torch.compile deferred to a function's
# first call (compilation itself is lazy in torch.compile anyway). With CUDA nothing changes. This lives here, not in
# cglab.compat, because it must be in place before the first `import megatron`, and every process imports `cglab`
# before any of its modules import Megatron-Core; cglab.compat.registry lists it with the other patches.
def _deferred(compile_):
    """`compile_` (torch.compile) applied at a function's first call instead of when it is decorated."""

    def jit_fuser(fn=None, **kwargs):
        if fn is None:  # @jit_fuser(...)
            return lambda f: jit_fuser(f, **kwargs)
        compiled = []

        @functools.wraps(fn)
        def call(*args, **kw):
            if not compiled:
                compiled.append(compile_(fn, **kwargs))
            return compiled[0](*args, **kw)

        call.__cglab_deferred_compile__ = True
        return call

    return jit_fuser


class _DeferMegatronCompile(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name != "megatron.core.jit":
            return None
        spec = importlib.machinery.PathFinder.find_spec(name, path)
        if spec is None or spec.loader is None:
            return spec
        load = spec.loader.exec_module

        def exec_module(module):
            load(module)
            import torch  # already imported: megatron.core.jit imports it

            if module.jit_fuser is torch.compile and not torch.cuda.is_available():
                module.jit_fuser = _deferred(torch.compile)

        spec.loader.exec_module = exec_module
        return spec


if "megatron.core.jit" not in sys.modules and not any(isinstance(f, _DeferMegatronCompile) for f in sys.meta_path):
    sys.meta_path.insert(0, _DeferMegatronCompile())
