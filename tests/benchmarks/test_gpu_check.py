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
    micro = re.search(r"MICRO_CASES=\$\{4:-([^}]*)\}", text).group(1).split(",")
    return default + extra + micro


def test_script_is_valid_bash():
    subprocess.run(["bash", "-n", str(SCRIPT)], check=True)


HF_CASES = ("hf", "hfc")  # HF CodeGen eager / torch.compile: built by hf_codegen_baseline, no cglab config


def test_script_names_the_hf_baselines():
    assert set(HF_CASES) <= set(_script_cases())


@pytest.mark.parametrize("case", sorted(set(_script_cases()) - set(HF_CASES)))
def test_every_case_exists_and_its_config_validates(case):
    assert case in train_throughput.CASES, f"gpu_check.sh names {case!r}, train_throughput.CASES has no such case"
    from cglab.config import from_dict

    cfg = from_dict(
        {},
        [
            "model.preset=codegen2-1B",
            "data.seq_length=2048",
            "train.micro_batch_size=4",
            "train.global_batch_size=4",
            "objective.kind=clm",
            *train_throughput.CASES[case],
        ],
    )
    assert cfg.model.hidden_size == 2048


def test_benchmark_default_cases_exist():
    for case in train_throughput.parser().get_default("cases").split(","):
        assert case in train_throughput.CASES or case in HF_CASES, case


def test_profiled_cases_are_measured_cases():
    profiled = re.search(r"PROFILE=\$\{3:-([^}]*)\}", SCRIPT.read_text()).group(1).split(",")
    default = re.search(r"CASES=\$\{2:-([^}]*)\}", SCRIPT.read_text()).group(1).split(",")
    assert profiled and set(profiled) <= set(default)


@pytest.mark.parametrize(
    "name, kind",
    [
        ("void pytorch_flash::flash_fwd_kernel<Flash_fwd_kernel_traits<128, 128, 64, 4>>", "attention"),
        ("cudnn_generated_fort_native_sdpa_sm90_flash_fprop_wgmma_f16_knob_3_64x64x128", "attention"),
        ("fmha_cutlassB_bf16_aligned_64x64_k128_sm80", "attention"),
        ("nvjet_tst_256x128_64x4_2x1_v_bz_coopB_TNT", "gemm"),
        ("sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n_tilesize128x256x64", "gemm"),
        ("void at::native::(anonymous namespace)::multi_tensor_apply_kernel<FusedAdamMathFunctor>", "optimizer"),
        ("void at::native::vectorized_elementwise_kernel<4, at::native::GeluCUDAKernelImpl>", "other"),
    ],
)
def test_profiler_kernel_kinds(name, kind):
    assert train_throughput.kernel_kind(name) == kind
