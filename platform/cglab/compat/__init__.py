"""Every patch cglab makes to Megatron-Core and torch, in one place, applied from one entry point and guarded.

    from cglab import compat
    compat.apply("cpu")                         # process-wide patches by name (registry.PATCHES), idempotent
    fold = compat.apply_to_optimizer(chunks, optimizer, fused_adam=True, fold=True)   # per-optimizer ones
    compat.seed_main_params(optimizer, {param: fp32_value})  # the fp32 main copy from full-precision values

Each patch module says what it replaces and why; `registry.PATCHES` lists every target with the versions it was
written for (`registry.TESTED`, the pyproject pins), the condition it is active under, the reason and how to undo
it, plus the private names of MLflow and Ray that cglab reads. Both entry points first check the installed
versions and refuse untested ones (`UntestedVersionError`) unless CGLAB_ALLOW_UNTESTED_VERSIONS=1 (or
allow_untested=True). tests/compat checks that every target still exists and that the CPU shim's list of
device="cuda" factory modules matches a scan of Megatron-Core's sources.

Optional libraries are flags (`HAVE_TE`, `HAVE_APEX`), as in Megatron-Core; each patch leaves an installed
library's own kernels alone.
"""

from __future__ import annotations

from cglab.compat import adam, cpu, foreach, gradscale, wgrad
from cglab.compat.flags import HAVE_APEX, HAVE_TE
from cglab.compat.mainparams import seed as seed_main_params
from cglab.compat.registry import ALLOW_ENV, PATCHES, TESTED, UntestedVersionError, check_versions, installed_versions

# name -> the function that applies it; each returns True when the patch is in effect
_APPLY = {"cpu": cpu.apply, "foreach": foreach.apply, "wgrad": wgrad.apply}


def apply(*names: str, allow_untested: bool | None = None) -> dict[str, bool]:
    """Apply the named process-wide patches ("cpu", "foreach", "wgrad") after the version check; returns
    {name: in effect}. Each is idempotent and leaves a process that does not need it (CUDA present, Apex or TE
    installed) untouched."""
    unknown = [n for n in names if n not in _APPLY]
    if unknown:
        raise ValueError(f"cglab.compat.apply: no patch named {', '.join(unknown)} (have {', '.join(_APPLY)})")
    check_versions(allow_untested)
    return {n: _APPLY[n]() for n in names}


def apply_to_optimizer(
    model_chunks, optimizer, *, fused_adam: bool, fold: bool, allow_untested: bool | None = None
) -> gradscale.GradFold | None:
    """The per-optimizer patches of a built Megatron optimizer: torch's fused AdamW kernel (`fused_adam`), then the
    grad-scale fold (`fold`), whose deferred factor is returned (None without it)."""
    check_versions(allow_untested)
    if fused_adam:
        adam.use_fused_adam(optimizer)
    return gradscale.install(model_chunks, optimizer) if fold else None


__all__ = [
    "ALLOW_ENV",
    "HAVE_APEX",
    "HAVE_TE",
    "PATCHES",
    "TESTED",
    "UntestedVersionError",
    "apply",
    "apply_to_optimizer",
    "check_versions",
    "installed_versions",
    "seed_main_params",
]
