"""Megatron-Core's import-time torch.compile, deferred on a host without CUDA (cglab/__init__.py): importing
Megatron-Core through cglab loads neither TorchDynamo's compiler nor Inductor, and a fused function is compiled, once,
at its first call."""

from __future__ import annotations

import subprocess
import sys

import pytest

from cglab import _deferred


def test_a_deferred_function_is_compiled_once_at_its_first_call():
    compiled = []

    def compile_(fn, **kwargs):
        compiled.append((fn.__name__, kwargs))
        return lambda *a: ("compiled", fn(*a))

    @_deferred(compile_)
    def add(a, b):
        return a + b

    @_deferred(compile_)(dynamic=False)
    def mul(a, b):
        return a * b

    assert compiled == [] and add.__name__ == "add"  # decorating compiles nothing
    assert add(1, 2) == ("compiled", 3) and add(2, 3) == ("compiled", 5)
    assert mul(2, 3) == ("compiled", 6)
    assert compiled == [("add", {}), ("mul", {"dynamic": False})]


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="with CUDA, jit_fuser stays torch.compile")
def test_importing_megatron_through_cglab_loads_no_compiler_on_cpu():
    """A fresh interpreter, as a Ray worker starts: cglab's model and training loop (all of Megatron-Core they use)."""
    code = (
        "import sys, torch, cglab.train.loop, cglab.model.codegen\n"
        "from megatron.core import jit\n"
        "from megatron.core.fusions import fused_bias_gelu\n"
        "print(jit.jit_fuser is torch.compile, getattr(fused_bias_gelu.bias_gelu, '__cglab_deferred_compile__', 0),\n"
        "      sorted(m for m in ('torch._inductor.compile_fx', 'torch._dynamo.eval_frame') if m in sys.modules))\n"
    )
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert p.returncode == 0, p.stderr[-3000:]
    assert p.stdout.split("\n")[0] == "False True []", p.stdout
