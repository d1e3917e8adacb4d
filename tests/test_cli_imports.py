"""`cglab --help` builds every area's parser without loading a heavy library: the function-local imports that
remain in cglab are there for exactly this (each says so), and this test is what keeps them honest."""

from __future__ import annotations

import json
import subprocess
import sys

# Seconds to import each, or a process-wide side effect (Ray's atexit hook, Megatron's TE/Apex warnings).
HEAVY = (
    "torch",
    "megatron",
    "ray",
    "mlflow",
    "pyarrow",
    "transformers",
    "tokenizers",
    "matplotlib",
    "pandas",
    "zstandard",
)


def test_help_imports_no_heavy_library():
    code = (
        "import json, sys\n"
        "from cglab.cli import build_parser\n"
        "build_parser().format_help()\n"
        f"print(json.dumps(sorted({{m.split('.')[0] for m in sys.modules}} & set({list(HEAVY)!r}))))\n"
    )
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    assert json.loads(p.stdout.strip().splitlines()[-1]) == []
