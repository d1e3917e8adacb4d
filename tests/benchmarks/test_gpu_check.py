"""The one-call GPU script and the throughput benchmark agree, so a lent device's minutes are not lost to a typo:
every case gpu_check.sh names exists, every cglab case builds a valid config, and the script is valid bash."""
from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "benchmarks" / "gpu_check.sh"
sys.path.insert(0, str(REPO / "benchmarks"))
import train_throughput  # noqa: E402


def _script_cases() -> list[str]:
    text = SCRIPT.read_text()
    default = re.search(r"CASES=\$\{2:-([^}]*)\}", text).group(1).split(",")
    extra = [c for m in re.findall(r"--cases (\S+)", text) if not m.startswith('"') for c in m.split(",")]
    return default + extra


def test_script_is_valid_bash():
    subprocess.run(["bash", "-n", str(SCRIPT)], check=True)


HF_CASES = ("hf", "hfc")  # HF CodeGen eager / torch.compile: built by hf_codegen_baseline, no cglab config


def test_script_names_the_hf_baselines():
    assert set(HF_CASES) <= set(_script_cases())


@pytest.mark.parametrize("case", sorted(set(_script_cases()) - set(HF_CASES)))
def test_every_case_exists_and_its_config_validates(case):
    assert case in train_throughput.CASES, f"gpu_check.sh names {case!r}, train_throughput.CASES has no such case"
    from cglab.config import from_dict

    cfg = from_dict({}, ["model.preset=codegen2-1B", "data.seq_length=2048", "train.micro_batch_size=4",
                         "train.global_batch_size=4", *train_throughput.CASES[case]])
    assert cfg.model.hidden_size == 2048


def test_benchmark_default_cases_exist():
    for case in train_throughput.parser().get_default("cases").split(","):
        assert case in train_throughput.CASES or case in HF_CASES, case
