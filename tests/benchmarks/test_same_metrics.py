"""benchmarks/same_metrics.py: two sweeps' final metrics compared per (variant, seed, metric), relative tolerance."""

from __future__ import annotations

import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "benchmarks"))
import same_metrics as sm  # noqa: E402


def test_equal_sweeps_agree_and_a_difference_or_a_missing_metric_is_reported():
    a = {("clm", "1", "eval/code_bpb"): 2.5, ("clm", "1", "loss"): 4.0, ("infill", "1", "loss"): 4.2}
    assert sm.compare(a, dict(a), 1e-6) == ([], [], 0.0)
    b = {**a, ("clm", "1", "eval/code_bpb"): 2.5 * (1 + 1e-5)}
    differ, lone, worst = sm.compare(a, b, 1e-6)
    assert differ == [("clm", "1", "eval/code_bpb")] and lone == [] and 9e-6 < worst < 1.1e-5
    assert sm.compare(a, b, 1e-4)[0] == []  # within a looser tolerance
    c = {k: v for k, v in a.items() if k[0] == "clm"}
    assert sm.compare(a, c, 1e-6)[1] == [("infill", "1", "loss")]
