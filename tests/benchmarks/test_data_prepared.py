"""benchmarks/data_prepared.py and its committed result, benchmarks/results/data_prepared.txt: the file names the
commit, machine and load it was measured at and holds all three parts; its balance table (a) is what the script
computes on the code as it is now (a change to the units of work that leaves the table stale fails here); the
script's all-ranks partition is `pipeline.balance`'s."""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

import numpy as np
import pytest

from cglab.data.pipeline import balance

REPO = Path(__file__).resolve().parents[2]
RESULT = REPO / "benchmarks" / "results" / "data_prepared.txt"
sys.path.insert(0, str(REPO / "benchmarks"))
import data_prepared  # noqa: E402


def test_the_committed_result_names_its_run_and_holds_every_part():
    text = RESULT.read_text()
    assert re.search(r"at commit [0-9a-f]{7}, \d{4}-\d\d-\d\d \d\d:\d\d UTC", text)
    assert re.search(r"machine: .+, \d+ cores", text) and re.search(r"load average at start: [\d.]+", text)
    for part in ("(a) units of work", "(b) one process, ABBA", "(c) prepare:"):
        assert part in text, part
    assert re.search(r"ratio prepared / raw: [\d.]+x", text)
    assert re.search(r"[\d,]+ CPU s per million documents", text)


def test_the_committed_balance_table_is_what_the_code_computes_now():
    args = argparse.Namespace(dp=[8, 64, 512], chunk_tokens=1 << 20, unit_tokens=1 << 22, seed=0)
    lines = data_prepared.balance_table(args)
    text = RESULT.read_text()
    for line in lines:
        assert line in text, line


@pytest.mark.parametrize("dp", [1, 3, 8])
def test_the_heap_partition_is_the_plain_longest_first_rule(dp):
    """pipeline.owners (one heap pass for every rank) against the rule written out: each unit, longest first,
    onto the least-loaded rank, ties to the lowest rank."""
    from cglab.data.pipeline import owners

    sizes = np.random.default_rng(dp).integers(1, 50, 40).astype(float).tolist()
    sizes[3] = sizes[7]  # a tie: the lower unit id goes first
    load, want = [0.0] * dp, [0] * len(sizes)
    for u in sorted(range(len(sizes)), key=lambda u: (-sizes[u], u)):
        r = min(range(dp), key=lambda r: (load[r], r))
        want[u], load[r] = r, load[r] + sizes[u]
    assert owners(sizes, dp).tolist() == want and balance(sizes, dp - 1, dp) == [
        u for u in range(40) if want[u] == dp - 1
    ]


def test_pieces_cut_each_file_at_chunk_tokens():
    got = data_prepared.pieces(np.array([2.5e6, 1e6, 3.0]), 1 << 20)
    assert got.tolist() == [1 << 20, 1 << 20, 2_500_000 - 2 * (1 << 20), 1_000_000, 3]
