"""MBPP: loader, the paper's 3-shot prompt, [DONE] extraction, scoring in the real sandbox.

tests/eval/data/mbpp.jsonl is a small file written for these tests in the published format (few-shot tasks 2-4,
test tasks 11-13, one validation task 600 that must not be scored)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from cglab.eval import mbpp
from cglab.eval.sandbox import Limits, isolation_mode

pytestmark = pytest.mark.no_ray  # its slow tests start no Ray: they run beside the Ray tests (Makefile: RAY_TESTS)

DATA = Path(__file__).with_name("data") / "mbpp.jsonl"


def test_load_tasks_and_splits():
    tasks = mbpp.load_tasks(DATA)
    assert list(tasks) == [2, 3, 4, 11, 12, 13, 600]
    assert [t["task_id"] for t in mbpp.fewshot(tasks, DATA)] == [2, 3, 4]
    assert list(mbpp.test_tasks(tasks)) == [11, 12, 13]  # 600 is validation, 2-4 are the prompt's examples
    assert list(mbpp.test_tasks(tasks, limit=2)) == [11, 12]
    assert tasks[13]["challenge_test_list"] == ['assert count_vowels("AEIOU") == 5']


@pytest.mark.parametrize(
    "line, message",
    [
        ('{"task_id": 5, "text": "x"', "not JSON"),
        ("[1, 2]", "JSON object"),
        ('{"task_id": 5, "text": "x", "code": "", "test_setup_code": ""}', "no 'test_list' field"),
        (
            '{"task_id": "5", "text": "x", "code": "", "test_list": [], "test_setup_code": ""}',
            "'task_id' should be int",
        ),
        ('{"task_id": 5, "text": "x", "code": "", "test_list": [1], "test_setup_code": ""}', "list of strings"),
        ('{"task_id": 2, "text": "x", "code": "", "test_list": [], "test_setup_code": ""}', "duplicate task_id 2"),
    ],
)
def test_malformed_record_names_file_and_line(tmp_path, line, message):
    bad = tmp_path / "mbpp.jsonl"
    lines = DATA.read_text().splitlines()
    bad.write_text("\n".join(lines[:2] + [line] + lines[2:]) + "\n")
    with pytest.raises(ValueError, match=rf"mbpp.jsonl:3: .*{message}"):
        mbpp.load_tasks(bad)


def test_missing_fewshot_tasks_are_named(tmp_path):
    path = tmp_path / "mbpp.jsonl"
    path.write_text("\n".join(line for line in DATA.read_text().splitlines() if '"task_id": 3,' not in line))
    with pytest.raises(ValueError, match=r"task_id\(s\) \[3\] are not in the file"):
        mbpp.fewshot(mbpp.load_tasks(path), path)


def test_three_shot_prompt_is_the_papers_format():
    tasks = mbpp.load_tasks(DATA)
    got = mbpp.prompt(tasks[11], mbpp.fewshot(tasks, DATA))
    want = (
        "You are an expert Python programmer, and here is your task: Write a function to return the sum of two "
        "numbers. Your code should pass these tests:\n\n"
        "assert add(1, 2) == 3\nassert add(-1, 1) == 0\nassert add(10, 5) == 15\n"
        "[BEGIN]\ndef add(a, b):\r\n  return a + b\n[DONE]\n"
        "You are an expert Python programmer, and here is your task: Write a python function to check whether a "
        "number is even. Your code should pass these tests:\n\n"
        "assert is_even(2) == True\nassert is_even(7) == False\nassert is_even(0) == True\n"
        "[BEGIN]\ndef is_even(n):\r\n  return n % 2 == 0\n[DONE]\n"
        "You are an expert Python programmer, and here is your task: Write a function to reverse a string. "
        "Your code should pass these tests:\n\n"
        'assert reverse_string("abc") == "cba"\nassert reverse_string("") == ""\n'
        'assert reverse_string("ab") == "ba"\n'
        "[BEGIN]\ndef reverse_string(s):\r\n  return s[::-1]\n[DONE]\n"
        "You are an expert Python programmer, and here is your task: Write a function to find the largest number "
        "in a list. Your code should pass these tests:\n\n"
        "assert largest([1, 5, 3]) == 5\nassert largest([-2, -7]) == -2\nassert largest([4]) == 4\n"
        "[BEGIN]\n"
    )
    assert got == want


def test_extract_stops_at_done():
    assert mbpp.extract("def f():\n  return 1\n[DONE]\nYou are an expert") == "def f():\n  return 1\n"
    assert mbpp.extract("def f(): pass") == "def f(): pass"


class _ReferenceModel:
    """A Generator that answers each prompt with the reference code of the task it ends with, then `[DONE]` and
    junk the extraction must drop; records the prompts (the protocol under test, not a model)."""

    def __init__(self, tasks):
        self.tasks, self.prompts = tasks, []

    def generate(self, prompts, *, n=1, temperature=0.0, top_p=1.0, max_new_tokens=128, stop=()):
        self.prompts += prompts
        assert stop == ("[DONE]",)
        outs = []
        for p in prompts:
            task = next(t for t in self.tasks.values() if p.endswith(mbpp.block(t, with_code=False)))
            outs.append([task["code"] + "\n[DONE]\nassert False"] * n)
        return outs


@pytest.mark.slow
def test_reference_completions_pass_through_generation_and_sandbox():
    tasks = mbpp.load_tasks(DATA)
    model = _ReferenceModel(tasks)
    res = mbpp.run(model, DATA, n=2)
    assert len(model.prompts) == 3 and all(p.startswith("You are an expert") for p in model.prompts)
    assert res["n_tasks"] == 3 and res["pass@1"] == 1.0  # task 12 needs its test_setup_code: it ran first
    assert res["statuses"] == {"passed": 6, "failed": 0, "timed_out": 0, "sandbox_error": 0}
    assert res["isolation"] == isolation_mode()


@pytest.mark.slow
def test_wrong_looping_and_early_exit_completions_do_not_pass():
    tasks = mbpp.load_tasks(DATA)
    samples = [
        {"task_id": 11, "completion": "def largest(xs):\n  return max(xs)"},
        {"task_id": 11, "completion": "def largest(xs):\n  return min(xs)"},  # wrong
        {"task_id": 11, "completion": "def largest(xs):\n  while True:\n    pass"},  # never returns
        {"task_id": 11, "completion": "import sys\nsys.exit(0)"},  # exits 0 before any assert runs
        {"task_id": 13, "completion": "def count_vowels(s):\r\n  return sum(c in 'aeiou' for c in s)"},
        {"task_id": 13, "completion": "def count_vowels(s):\n  return len(s)"},
    ]
    res = mbpp.evaluate(samples, tasks, limits=Limits(timeout_s=5))
    assert res["tasks"]["11"]["passed"] == 1 and res["tasks"]["13"]["passed"] == 1
    assert [r["status"] for r in res["tasks"]["11"]["results"]] == ["passed", "failed", "timed out", "failed"]
    assert "exited 0 before the end" in res["tasks"]["11"]["results"][3]["error"]
    assert res["pass@1"] == pytest.approx((1 / 4 + 1 / 2) / 2)
    assert res["statuses"] == {"passed": 2, "failed": 3, "timed_out": 1, "sandbox_error": 0}
    # The challenge tests are extra asserts: the lower-case-only solution of task 13 fails them.
    hard = mbpp.evaluate(samples[4:5], tasks, challenge=True)
    assert hard["pass@1"] == 0.0 and hard["challenge_tests"] is True
    with pytest.raises(ValueError, match="unknown MBPP task_id"):
        mbpp.evaluate([{"task_id": 99, "completion": ""}], tasks)


@pytest.mark.slow
def test_cli_scores_a_samples_file(tmp_path, capsys):
    from cglab.cli import main

    samples = tmp_path / "samples.jsonl"
    samples.write_text(
        json.dumps({"task_id": 11, "completion": "def largest(xs):\n  return max(xs)"})
        + "\n"
        + json.dumps({"task_id": 12, "completion": "def rect_area(r):\n  return 0"})
        + "\n"
    )
    assert main(["eval", "mbpp", "--samples", str(samples), "--data-dir", str(DATA.parent)]) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["pass@1"] == 0.5 and res["statuses"]["passed"] == 1 and res["statuses"]["failed"] == 1
    assert main(["eval", "mbpp", "--samples", str(samples), "--data-dir", str(tmp_path)]) == 2
    assert f"expected {tmp_path / 'mbpp.jsonl'}" in capsys.readouterr().err
    shutil.copy(DATA, tmp_path / "mbpp.jsonl")
    samples.write_text('{"task_id": 11}\n')
    assert main(["eval", "mbpp", "--samples", str(samples), "--data-dir", str(tmp_path)]) == 2
    assert "samples.jsonl:1" in capsys.readouterr().err
