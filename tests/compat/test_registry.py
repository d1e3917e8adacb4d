"""cglab.compat's guard: every name it patches or reads exists in the installed libraries, the CPU shim lists every
Megatron-Core module cglab reaches that builds tensors on a literal "cuda" device, and an untested version is
refused unless allowed."""

from __future__ import annotations

import ast
import importlib
import inspect
import pkgutil
import re
import sys
from pathlib import Path

import pytest

import cglab
from cglab import compat
from cglab.compat import cpu, registry

# A target is "module:attr.path" or "module:#text" (see cglab.compat.registry).


def _resolve(target: str) -> None:
    """Raise AssertionError naming the target when it does not exist in the installed version."""
    module, _, rest = target.partition(":")
    mod = importlib.import_module(module)
    if rest.startswith("#"):
        assert rest[1:] in inspect.getsource(mod), f"{target}: text not in {mod.__file__}"
        return
    obj = mod
    for part in rest.split("."):
        assert hasattr(obj, part), f"{target}: {getattr(obj, '__name__', obj)!s} has no {part!r}"
        obj = getattr(obj, part)


@pytest.mark.parametrize("target", [t for p in registry.PATCHES for t in p.targets])
def test_every_patched_or_read_name_exists(target):
    _resolve(target)


def test_every_patch_says_why_when_and_how_to_undo():
    names = [p.name for p in registry.PATCHES if p.name]
    assert len(names) == len(set(names))
    assert {"cpu", "foreach", "wgrad"} <= set(names)
    for p in registry.PATCHES:
        assert p.targets and p.reason and p.when and p.undo, p
        importlib.import_module(p.module)


def test_tested_versions_are_the_pins():
    text = (Path(cglab.__file__).parents[2] / "pyproject.toml").read_text()
    for lib, version in registry.TESTED.items():
        assert f'"{lib}=={version}"' in text


# ----------------------------------------------------------------------------------- the CPU shim's module list
_FACTORIES = {
    "zeros",
    "ones",
    "empty",
    "tensor",
    "full",
    "arange",
    "rand",
    "randn",
    "randint",
    "as_tensor",
    "zeros_like",
    "ones_like",
    "empty_like",
    "full_like",
    "linspace",
    "eye",
}
_MEGATRON_IMPORT = re.compile(r"^\s*(?:from|import)\s+(megatron\.core[\w.]*)", re.M)
_MEGATRON_FROM = re.compile(r"^\s*from\s+(megatron\.core[\w.]*)\s+import\s+(\([^)]*\)|[^\n#]+)", re.M)


def _is_cuda(node) -> bool:
    if isinstance(node, ast.Constant):
        return isinstance(node.value, str) and node.value.split(":")[0] == "cuda"
    return (
        isinstance(node, ast.Call)
        and isinstance(node.func, ast.Attribute)
        and node.func.attr == "device"
        and bool(node.args)
        and _is_cuda(node.args[0])
    )


def cuda_factories(path: str) -> list[tuple[str, str, int]]:
    """(qualified function, call, line) of every tensor factory called with a literal "cuda" device in a file."""
    out = []

    def walk(node, scope):
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef):
                walk(child, scope + [child.name])
                continue
            if (
                isinstance(child, ast.Call)
                and isinstance(child.func, ast.Attribute)
                and child.func.attr in _FACTORIES
                and any(k.arg == "device" and _is_cuda(k.value) for k in child.keywords)
            ):
                out.append((".".join(scope), ast.unparse(child.func), child.lineno))
            walk(child, scope)

    walk(ast.parse(Path(path).read_text()), [])
    return out


def megatron_modules_cglab_imports() -> list[str]:
    """Every megatron.core module loaded once cglab's Megatron-using modules are imported, plus every one cglab
    imports inside a function (found in its sources) and the shim's own list."""
    root = Path(cglab.__file__).parent
    lazy = set(cpu.CUDA_FACTORY_MODULES)
    for f in root.rglob("*.py"):
        src = f.read_text()
        found = _MEGATRON_IMPORT.findall(src)
        lazy.update(found)
        for pkg, names in _MEGATRON_FROM.findall(src):  # `from megatron.core import dist_checkpointing`: a module
            lazy.update(f"{pkg}.{n.split(' as ')[0].strip()}" for n in names.strip("()").split(","))
        if found:
            importlib.import_module("cglab." + ".".join(f.relative_to(root).with_suffix("").parts))
    for name in sorted(lazy):
        try:
            mod = importlib.import_module(name)
        except ImportError:  # an optional extension (Transformer Engine) this machine lacks: nothing to scan
            continue
        if name != "megatron.core" and hasattr(mod, "__path__"):
            # a package cglab calls into (dist_checkpointing) loads its strategies lazily, at save or load time:
            # scan them all, so that the result does not depend on which tests ran before
            for sub in pkgutil.walk_packages(mod.__path__, name + ".", onerror=lambda _: None):
                try:
                    importlib.import_module(sub.name)
                except Exception:  # optional back ends (zarr, TE, nvidia-resiliency) missing here
                    pass
    return sorted(
        n
        for n, m in list(sys.modules.items())
        if n.startswith("megatron.core") and getattr(m, "__file__", "") and m.__file__.endswith(".py")
    )


def classify(modules) -> tuple[dict, dict]:
    """(covered: module -> hits the shim redirects, uncovered: "module:function" -> hits nobody accounts for)."""
    redirected = {n for n in vars(cpu._CpuTorch) if not n.startswith("_")}  # the factories _CpuTorch overrides
    covered, uncovered = {}, {}
    for name in modules:
        for qual, call, line in cuda_factories(sys.modules[name].__file__):
            if f"{name}:{qual}" in cpu.GPU_ONLY_CUDA_FACTORIES or name in cpu.GPU_ONLY_CUDA_FACTORIES:
                continue
            if name in cpu.CUDA_FACTORY_MODULES and call in {f"torch.{f}" for f in redirected}:
                covered.setdefault(name, []).append((qual, call, line))
            else:
                uncovered.setdefault(f"{name}:{qual}", []).append((call, line))
    return covered, uncovered


def test_cpu_shim_lists_exactly_the_modules_with_cuda_factories():
    covered, uncovered = classify(megatron_modules_cglab_imports())
    assert not uncovered, (
        "Megatron-Core builds tensors on a literal 'cuda' device where cglab.compat.cpu neither redirects them "
        f"(CUDA_FACTORY_MODULES, through torch.{{zeros,ones,empty,tensor}}) nor says why a CPU run never gets "
        f"there (GPU_ONLY_CUDA_FACTORIES): {uncovered}"
    )
    stale = sorted(set(cpu.CUDA_FACTORY_MODULES) - set(covered))
    assert not stale, f"CUDA_FACTORY_MODULES lists modules with no literal-'cuda' factory left: {stale}"
    for key in cpu.GPU_ONLY_CUDA_FACTORIES:  # and the exemptions still name code that exists
        name, _, qual = key.partition(":")
        hits = {q for q, _, _ in cuda_factories(importlib.import_module(name).__file__)}
        assert (qual in hits) if qual else hits, f"GPU_ONLY_CUDA_FACTORIES: {key} has no literal-'cuda' factory"


def test_the_scan_finds_a_factory_it_was_not_told_about(tmp_path, monkeypatch):
    """The scan itself: a module like Megatron main's new optimizer code, with a device="cuda" scalar, is flagged."""
    mod = tmp_path / "fake_megatron_module.py"
    mod.write_text(
        'import torch\n\nclass Opt:\n    def step(self):\n        return (torch.zeros(1, device="cuda")'
        " + torch.tensor([1.0], device=torch.device('cuda')))\n"
    )
    assert cuda_factories(str(mod)) == [("Opt.step", "torch.zeros", 5), ("Opt.step", "torch.tensor", 5)]
    monkeypatch.syspath_prepend(str(tmp_path))
    importlib.import_module("fake_megatron_module")
    _, uncovered = classify(["fake_megatron_module"])
    assert list(uncovered) == ["fake_megatron_module:Opt.step"]


# ----------------------------------------------------------------------------------- versions
@pytest.fixture
def untested(monkeypatch):
    monkeypatch.setattr(registry, "installed_versions", lambda: {"megatron-core": "0.17.0", "torch": "2.13.0"})
    monkeypatch.delenv(registry.ALLOW_ENV, raising=False)


def test_the_installed_versions_are_the_tested_ones():
    assert compat.check_versions() == registry.TESTED


def test_an_untested_version_is_refused_by_every_entry_point(untested):
    with pytest.raises(
        compat.UntestedVersionError,
        match=r"megatron-core 0\.17\.0 \(patches written for 0\.16\.1\)"
        r".*CGLAB_ALLOW_UNTESTED_VERSIONS=1",
    ):
        compat.check_versions()
    with pytest.raises(compat.UntestedVersionError):
        compat.apply("foreach")
    with pytest.raises(compat.UntestedVersionError):
        compat.apply_to_optimizer([], None, fused_adam=False, fold=False)


def test_an_untested_version_runs_when_allowed(untested, monkeypatch):
    with pytest.warns(UserWarning, match="untested versions"):
        assert compat.check_versions(allow_untested=True)["megatron-core"] == "0.17.0"
    monkeypatch.setenv(registry.ALLOW_ENV, "1")
    registry._WARNED.clear()
    with pytest.warns(UserWarning, match="CGLAB_ALLOW_UNTESTED_VERSIONS=1"):
        compat.check_versions()
    with pytest.raises(compat.UntestedVersionError):  # an explicit False wins over the environment
        compat.check_versions(allow_untested=False)


def test_apply_names_only_known_patches():
    with pytest.raises(ValueError, match="no patch named gpu"):
        compat.apply("gpu")
    assert compat.apply() == {}
