"""One MFU: the benchmark tables and the training loop's live metric both come from cglab.train.flops.mfu, model
FLOP/s over the datasheet dense bf16 peak (989 TFLOP/s on an H100 SXM), not over a matmul peak measured in the run."""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest
import torch

from cglab.config import ModelConfig
from cglab.train import flops

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "benchmarks"))
import train_throughput  # noqa: E402

# codegen2-1B at seq 2048 (L=16, d=2048, V=51200), written out rather than taken from flops_per_token:
# 6·(12·L·d² + V·d) + 12·L·d·S
FLOPS_PER_TOKEN_1B = 6 * (12 * 16 * 2048**2 + 51200 * 2048) + 12 * 16 * 2048 * 2048
# benchmarks/results/train_throughput_h100.txt, run 3: cglab, 8 micro-batches, 532.8 TFLOP/s, and the matmul peak
# measured in that process
TOKENS_PER_S, MEASURED_PEAK = 85022, 790.2


@pytest.fixture
def model_1b():
    return ModelConfig(preset="codegen2-1B")


@pytest.fixture
def on_h100(monkeypatch):
    """This process as seen on an H100 host: device_peak_tflops looks the datasheet peak up by device name."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "NVIDIA H100 80GB HBM3")


def test_mfu_is_model_flops_over_the_datasheet_peak(model_1b, on_h100):
    assert flops.flops_per_token(model_1b, 2048) == FLOPS_PER_TOKEN_1B
    want = TOKENS_PER_S * FLOPS_PER_TOKEN_1B / 989e12
    assert want == pytest.approx(0.5387, abs=1e-4)
    assert flops.mfu(TOKENS_PER_S, model_1b, 2048, peak_tflops=989.0) == pytest.approx(want, rel=1e-12)
    assert flops.mfu(TOKENS_PER_S, model_1b, 2048) == pytest.approx(want, rel=1e-12)  # the device's own peak
    # tokens/s are the whole job's: eight GPUs at eight times the throughput are as utilised as one
    assert flops.mfu(8 * TOKENS_PER_S, model_1b, 2048, num_gpus=8) == pytest.approx(want, rel=1e-12)


def test_mfu_is_none_without_a_known_peak(model_1b, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert flops.mfu(TOKENS_PER_S, model_1b, 2048) is None


def test_benchmark_row_reports_flops_mfu(model_1b, on_h100):
    r = train_throughput.result_row("cglab", float(TOKENS_PER_S), model_1b, 2048, measured_peak_tflops=MEASURED_PEAK)
    assert r["tokens_per_s"] == TOKENS_PER_S and r["tflops"] == pytest.approx(532.8, abs=0.05)
    assert r["mfu"] == pytest.approx(flops.mfu(TOKENS_PER_S, model_1b, 2048), abs=5e-5)
    assert r["mfu"] == pytest.approx(0.5387, abs=5e-5)
    # the measured-peak figure is a second, separately named number: the 67.4% recorded for this row
    assert r["of_measured_peak"] == pytest.approx(0.674, abs=5e-4)
    line = train_throughput.table_line({**r, "mem_gb": 26.2})
    header = train_throughput.TABLE_HEADER
    assert line.split()[3:5] == ["53.9%", "67.4%"]
    assert header.split()[3:5] == ["MFU(datasheet)", "of-measured-peak"]


def test_benchmark_row_without_a_datasheet_peak_says_so(model_1b, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    r = train_throughput.result_row("cglab", float(TOKENS_PER_S), model_1b, 2048, measured_peak_tflops=MEASURED_PEAK)
    assert r["mfu"] is None
    assert train_throughput.table_line(r).split()[3:5] == ["n/a", "67.4%"]


def test_training_loop_metric_is_flops_mfu():
    """The loop runs only inside Ray Train workers on a GPU, so its source is checked: the value its throughput
    callback logs as `mfu` is a call of cglab.train.flops.mfu, not an MFU of its own."""
    tree = ast.parse((REPO / "platform" / "cglab" / "train" / "callbacks.py").read_text())
    worker = next(f for f in ast.walk(tree) if isinstance(f, ast.ClassDef) and f.name == "Throughput")
    imported = {
        a.asname or a.name: (n.module, a.name) for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) for a in n.names
    }
    values = [
        n.value
        for n in ast.walk(worker)
        if isinstance(n, ast.Assign)
        for t in n.targets
        if isinstance(t, ast.Subscript) and getattr(t.slice, "value", None) == "mfu"
    ]
    assert len(values) == 1
    call = values[0]
    assert isinstance(call, ast.Call) and isinstance(call.func, ast.Name), ast.unparse(call)
    assert imported[call.func.id] == ("cglab.train.flops", "mfu"), ast.unparse(call)
