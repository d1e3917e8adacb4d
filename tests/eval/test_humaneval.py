from __future__ import annotations

import json
import random
from fractions import Fraction
from math import comb

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cglab.eval import humaneval as he
from cglab.eval.sandbox import Limits, isolation_mode

pytestmark = pytest.mark.no_ray  # its slow tests start no Ray: they run beside the Ray tests (Makefile: RAY_TESTS)


def reference_pass_at_k(n: int, c: int, k: int) -> Fraction:
    """Exact: 1 - P(all k drawn without replacement from n fail) = 1 - C(n-c, k) / C(n, k)."""
    return 1 - Fraction(comb(n - c, k), comb(n, k))


@given(st.integers(1, 200).flatmap(lambda n: st.tuples(st.just(n), st.integers(0, n), st.integers(1, n))))
@settings(max_examples=300, deadline=None)
def test_pass_at_k_matches_exact_combinatorics(nck):
    n, c, k = nck
    assert he.pass_at_k(n, c, k) == pytest.approx(float(reference_pass_at_k(n, c, k)), abs=1e-9)


def test_aggregate_reports_only_ks_every_task_supports():
    rng = random.Random(0)
    per_task = {f"t{i}": [rng.random() < 0.3 for _ in range(n)] for i, n in enumerate([12, 15, 10])}
    agg = he.aggregate(per_task)
    assert set(agg) == {"pass@1", "pass@10"}
    want = sum(float(reference_pass_at_k(len(v), sum(v), 10)) for v in per_task.values()) / 3
    assert agg["pass@10"] == pytest.approx(want)
    assert agg["pass@1"] == pytest.approx(sum(sum(v) / len(v) for v in per_task.values()) / 3)


def test_problems_are_the_164_shipped():
    problems = he.load_problems()
    assert len(problems) == 164
    assert list(problems)[0] == "HumanEval/0" and list(problems)[-1] == "HumanEval/163"


@pytest.mark.parametrize(
    "completion, want",
    [
        ("    return 1\n\ndef g():\n    pass", "    return 1\n"),
        ("    return 1\nif __name__ == '__main__':\n    f()", "    return 1"),
        ("    x = 1\n# comment\n", "    x = 1"),
        ("    return 2\nprint(f())\nclass A: pass", "    return 2"),
        ("    if x:\n        return 1\n", "    if x:\n        return 1\n"),  # indented stops are not stops
    ],
)
def test_truncate(completion, want):
    assert he.truncate(completion) == want


@pytest.mark.slow
def test_canonical_solutions_all_pass_and_empty_all_fail():
    problems = he.load_problems()
    canonical = [{"task_id": t, "completion": p["canonical_solution"]} for t, p in problems.items()]
    empty = [{"task_id": t, "completion": ""} for t in problems]
    res = he.evaluate(canonical, problems)
    assert res["n_tasks"] == 164 and res["pass@1"] == 1.0, [t for t, v in res["tasks"].items() if not v["passed"]]
    res_empty = he.evaluate(empty, problems)
    assert res_empty["n_tasks"] == 164 and res_empty["pass@1"] == 0.0


@pytest.mark.slow
def test_evaluate_samples_file_and_cli(tmp_path, capsys):
    from cglab.cli import main

    problems = he.load_problems()
    ids = ["HumanEval/0", "HumanEval/1", "HumanEval/2"]
    rows = []
    for t in ids:  # two samples per task: one right, one wrong (followed by junk the stops must cut)
        rows.append({"task_id": t, "completion": problems[t]["canonical_solution"] + "\nprint(undefined_name)\n"})
        rows.append({"task_id": t, "completion": "    return None\n"})
    samples = tmp_path / "samples.jsonl"
    samples.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    out = tmp_path / "res.json"
    direct = he.evaluate_samples(samples, out)
    assert direct["pass@1"] == pytest.approx(0.5) and "pass@10" not in direct
    assert json.loads(out.read_text())["pass@1"] == pytest.approx(0.5)
    assert main(["eval", "humaneval", "--samples", str(samples)]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["pass@1"] == pytest.approx(0.5)
    assert printed["tasks"]["HumanEval/1"] == {**printed["tasks"]["HumanEval/1"], "n": 2, "passed": 1}
    # the score's conditions are in the JSON: every status counted (zeros too) and the sandbox mode
    assert printed["statuses"] == {"passed": 3, "failed": 3, "timed_out": 0, "sandbox_error": 0}
    assert printed["isolation"] == isolation_mode()


@pytest.mark.slow
def test_pass_at_k_reports_status_counts_and_isolation():
    problems = {t: p for t, p in he.load_problems().items() if t in ("HumanEval/0", "HumanEval/2")}
    loop = "    while True:\n        pass\n"
    samples = [
        {"task_id": t, "completion": c}
        for t in problems
        for c in (problems[t]["canonical_solution"], "    return None\n", loop)
    ]
    res = he.evaluate(samples, problems, limits=Limits(timeout_s=8))
    assert res["pass@1"] == pytest.approx(1 / 3)
    assert res["statuses"] == {"passed": 2, "failed": 2, "timed_out": 2, "sandbox_error": 0}
    assert res["isolation"] == isolation_mode()
    # A jail that cannot be built (an RLIMIT_NOFILE no kernel grants) is a sandbox error, counted as such and
    # not folded into "failed", though it scores as not passing.
    broken = he.evaluate(samples[:2], problems, limits=Limits(timeout_s=8, open_files=1 << 40))
    assert broken["pass@1"] == 0.0
    assert broken["statuses"] == {"passed": 0, "failed": 0, "timed_out": 0, "sandbox_error": 2}
    assert "setup failed" in broken["tasks"]["HumanEval/0"]["results"][0]["error"]


def test_bad_samples_name_file_and_line(tmp_path, capsys):
    from cglab.cli import main

    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"task_id": "HumanEval/0", "completion": ""}\n{"completion": "x"}\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:2"):
        he.read_samples(bad)
    assert main(["eval", "humaneval", "--samples", str(bad)]) == 2
    assert "bad.jsonl:2" in capsys.readouterr().err
    unknown = tmp_path / "unknown.jsonl"
    unknown.write_text('{"task_id": "HumanEval/999", "completion": ""}\n')
    with pytest.raises(ValueError, match="HumanEval/999"):
        he.evaluate_samples(unknown)
