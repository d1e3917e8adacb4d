"""MTPB: loader, the multi-turn prompt protocol, truncation, print injection, equivalence, scoring in the sandbox.

tests/eval/data/mtpb.jsonl is a small file written for these tests in the published format: problem 1 (string,
placeholder in the first turn), 2 (a list of tuples expected as a list of lists), 3 (a float, no print turn, an
escaped `{{float}}` in a prompt, no max_gen_length); being 3 of the published 115 problems, it is loaded as a
deliberate subset."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cglab.eval import mtpb
from cglab.eval.sandbox import Limits, isolation_mode

pytestmark = pytest.mark.no_ray  # its slow tests start no Ray: they run beside the Ray tests (Makefile: RAY_TESTS)

DATA = Path(__file__).with_name("data") / "mtpb.jsonl"

# Known-correct code per turn text (the filled-in turn, as the model sees it after "# ").
REFERENCE = {
    'Assign the string "abc" to a variable named "s".': 's = "abc"',
    'Assign the string "Hi there" to a variable named "s".': 's = "Hi there"',
    'Convert "s" to upper case and store the result in "loud".': "loud = s.upper()",
    'Print "loud".': "print(loud)",
    'Assign the list [1, 2] to a variable named "nums".': "nums = [1, 2]",
    'Assign the list [] to a variable named "nums".': "nums = []",
    'Pair each number in "nums" with its square as a tuple, in a list named "pairs".': "pairs = [(x, x * x) for x in nums]",  # noqa: E501
    'Print "pairs".': "print(pairs)",
    'Define a list named "xs" with the values [1, 2, 3].': "xs = [1, 2, 3]",
    'Define a list named "xs" with the values [0.1, 0.2].': "xs = [0.1, 0.2]",
    'Compute the mean of "xs" as "m" (a {float}).': "m = sum(xs) / len(xs)",  # no print: one gets injected
}


class _ScriptedModel:
    """A Generator that writes the reference code for the turn its prompt ends with, followed by text the
    released sampler's truncation drops (a comment line and a next turn); records every prompt. It stands in
    for a model so that the protocol (what the model is shown, turn after turn) can be checked exactly."""

    def __init__(self, code=REFERENCE):
        self.code, self.prompts, self.budgets = code, [], []

    def generate(self, prompts, *, n=1, temperature=0.0, top_p=1.0, max_new_tokens=128, stop=()):
        assert n == 1 and stop == mtpb.STOPS
        self.prompts += prompts
        self.budgets += [max_new_tokens] * len(prompts)
        turn = [p.rstrip("\n").rsplit("\n", 1)[-1].removeprefix("# ") for p in prompts]
        return [[self.code[t] + "\n# the model rambles on\nx = 1\n"] for t in turn]


def test_load_problems():
    problems = mtpb.load_problems(DATA, subset=True)
    assert [p["id"] for p in problems] == ["1", "2", "3"]
    # 256 when the record has none: the released sampler's default (mtpb_sample.py, max_gen_length=256)
    assert [p["max_gen_length"] for p in problems] == [64, 64, 256]
    assert mtpb.turns(problems[1], 0)[0] == 'Assign the list [1, 2] to a variable named "nums".'  # a list: repr
    assert mtpb.turns(problems[2], 1)[1] == 'Compute the mean of "xs" as "m" (a {float}).'  # {{ }}: literal


@pytest.mark.parametrize(
    "record, message",
    [
        ('{"id": "9", "prompts": ["x"]', "not JSON"),
        ('{"id": "9", "prompts": ["x"], "inputs": [{}]}', "no 'outputs' field"),
        ('{"id": "9", "prompts": [], "inputs": [], "outputs": []}', "non-empty list of strings"),
        ('{"id": "9", "prompts": ["x"], "inputs": [{}, {}], "outputs": [1]}', "one expected result per input"),
        (
            '{"id": "9", "prompts": ["Use {A} and {B}."], "inputs": [{"A": 1}], "outputs": [1]}',
            r"inputs\[0\] has no value for placeholder 'B'",
        ),
        ('{"id": "9", "prompts": ["Use {A."], "inputs": [{"A": 1}], "outputs": [1]}', "not a valid"),
        ('{"id": "1", "prompts": ["x"], "inputs": [], "outputs": []}', "duplicate id 1"),
    ],
)
def test_malformed_record_names_file_and_line(tmp_path, record, message):
    bad = tmp_path / "mtpb.jsonl"
    lines = DATA.read_text().splitlines()
    bad.write_text("\n".join(lines[:1] + [record] + lines[1:]) + "\n")
    with pytest.raises(ValueError, match=rf"mtpb.jsonl:2\b.*{message}"):
        mtpb.load_problems(bad)


def test_multi_turn_prompts_carry_earlier_turns_and_own_code():
    problems = mtpb.load_problems(DATA, subset=True)
    model = _ScriptedModel()
    samples = mtpb.generate_samples(model, problems[:1])
    assert [(s["id"], s["case"]) for s in samples] == [("1", 0), ("1", 1)]
    # Turn by turn, case 0: the history is the prefix, the earlier turns as comments and the code written for
    # them (truncated before the comment line the model went on to write, so keeping its newline), each
    # followed by "\n\n", as the released sampler builds it.
    t1 = mtpb.PREFIX + '# Assign the string "abc" to a variable named "s".\n'
    t2 = t1 + 's = "abc"\n\n\n' + '# Convert "s" to upper case and store the result in "loud".\n'
    t3 = t2 + "loud = s.upper()\n\n\n" + '# Print "loud".\n'
    assert model.prompts[0::2] == [t1, t2, t3]  # the two cases alternate within each turn's batch
    assert model.prompts[1].startswith(mtpb.PREFIX + '# Assign the string "Hi there"')
    assert samples[0]["program"] == t3 + "print(loud)\n\n\n"
    assert samples[0]["turns"] == ['s = "abc"\n', "loud = s.upper()\n", "print(loud)\n"]
    assert model.budgets == [64] * 6  # the problem's max_gen_length, per turn
    mtpb.generate_samples(model, problems[:1], max_new_tokens=7)
    assert model.budgets[-1] == 7
    mtpb.generate_samples(model, problems[2:])  # no max_gen_length: the released sampler's 256 a turn
    assert model.budgets[-4:] == [256] * 4


def _renumbered(count: int) -> str:
    """An MTPB file of `count` problems: the test file's records, cycled, with fresh ids."""
    records = [json.loads(line) for line in DATA.read_text().splitlines()]
    return "".join(json.dumps({**records[i % len(records)], "id": str(i + 1)}) + "\n" for i in range(count))


def test_problem_count_is_the_published_115(tmp_path):
    full = tmp_path / "mtpb.jsonl"
    full.write_text(_renumbered(mtpb.N_PROBLEMS))
    assert len(mtpb.load_problems(full)) == 115
    for count in (114, 116):
        full.write_text(_renumbered(count))
        with pytest.raises(ValueError, match=rf"{full}: {count} MTPB problems.*has 115.*--mtpb-subset"):
            mtpb.load_problems(full)
        assert len(mtpb.load_problems(full, subset=True)) == count  # a deliberate subset: said so


@pytest.mark.parametrize(
    "text, want",
    [
        ("x = 1\n# next turn\ny = 2", "x = 1\n"),
        ("#x = 1", ""),
        ("x = 1\n\n\n\ny = 2", "x = 1"),
        ('x = 1\n"""doc', "x = 1\n"),
        ("print(1)\nprint(2)\n", "print(1)\n"),  # a second top-level print starts the next turn's work
        ("def f():\n    return 1\ndef g():\n    pass", "def f():\n    return 1\n"),
        ("x = 1<|endoftext|>junk", "x = 1"),
        ("if a:\n    # inside\n    b = 1\n", "if a:\n    # inside\n    b = 1\n"),  # only line-start #
    ],
)
def test_truncate(text, want):
    assert mtpb.truncate(text) == want


@pytest.mark.parametrize(
    "code, want",
    [
        ("def f(a):\n    return a ** 2\nf(2)", "def f(a):\n    return a ** 2\nprint(f(2))"),  # the released test
        ("df.groupby('g')['a'].value_counts()", "print(df.groupby('g')['a'].value_counts())"),
        ("x = 1\ny = x + 1", "x = 1\ny = x + 1\nprint(y)"),
        ("total = 0\ntotal += 5", "total = 0\ntotal += 5\nprint(total)"),
        ("a, b = 1, 2", "a, b = (1, 2)\nprint((a, b))"),
        ("z: int = 3", "z: int = 3\nprint(z)"),
        ("x = 1\nprint(x)", "x = 1\nprint(x)"),  # already prints: untouched
        ("for i in range(3):\n    print(i)", "for i in range(3):\n    print(i)"),  # not an expression: untouched
        ("d['k'] = 1", "d['k'] = 1"),  # not a name: untouched
        ("def f(:\n", "def f(:\n"),  # does not parse: runs (and fails) as it is
    ],
)
def test_inject_print(code, want):
    assert mtpb.inject_print(code) == want


@pytest.mark.parametrize(
    "actual, expected, same",
    [
        ((1, 2), [1, 2], True),
        ([(1, 1), (2, 4)], [[1, 1], [2, 4]], True),  # list/tuple at any depth
        ([1, 2], [2, 1], False),
        ([1, 2], [1, 2, 3], False),
        (0.15000000000000002, 0.15, True),
        (2.0 + 5e-7, 2, True),  # within 1e-6
        (2.0 + 5e-6, 2, False),
        (3.7, 3, False),  # no truncating cast to the expected int
        ([0.1 + 0.2], [0.3], True),
        (np.array([1.0, 2.0]), [1, 2], True),
        (np.int64(5), 5, True),
        (np.float32(0.5), 0.5, True),
        (5, "5", True),  # read as the expected type, as the released scorer did
        ("3.14", 3.14, True),
        ("abc", 3, False),
        ("False", False, True),
        (0, False, False),  # bools compare as text: bool("False") would be True
        ({1: ["a"]}, {"1": ["a"]}, True),  # JSON keys are strings
        ({1: ["a"]}, {"2": ["a"]}, False),
        ("None", None, True),
        (None, None, True),
        ("ab", ["a", "b"], False),
        (float("inf"), 2.0, False),
    ],
)
def test_equivalent(actual, expected, same):
    assert mtpb.equivalent(actual, expected) is same


@pytest.mark.slow
def test_reference_dialogues_pass_in_the_sandbox():
    problems = mtpb.load_problems(DATA, subset=True)
    samples = mtpb.generate_samples(_ScriptedModel(), problems, n=2)
    res = mtpb.evaluate(samples, problems)
    assert res["pass_rate"] == 1.0 and res["pass@1"] == 1.0, res["problems"]
    assert res["n_problems"] == 3 and res["n_samples"] == 12
    assert res["statuses"] == {"passed": 12, "failed": 0, "timed_out": 0, "sandbox_error": 0}
    assert res["isolation"] == isolation_mode()


@pytest.mark.slow
def test_wrong_looping_and_silent_programs_do_not_pass():
    problems = mtpb.load_problems(DATA, subset=True)
    samples = [
        {"id": "1", "case": 0, "program": 's = "abc"\nprint(s.upper())'},
        {"id": "1", "case": 0, "program": 's = "abc"\nprint(s)'},  # wrong output
        {"id": "1", "case": 1, "program": 'print("HI THERE")\nwhile True:\n    pass'},  # never ends
        {"id": "1", "case": 1, "program": 'import os\nprint("HI THERE", flush=True)\nos._exit(0)'},  # skips the check
        {"id": "2", "case": 0, "program": "for i in range(2):\n    pairs = i"},  # prints nothing
        {"id": "2", "case": 0, "program": "raise ValueError('boom')"},
        {"id": "3", "case": 1, "program": "import numpy as np\nxs = np.array([0.1, 0.2])\nxs.mean()"},
    ]
    res = mtpb.evaluate(samples, problems, limits=Limits(timeout_s=5))
    statuses = [[r["status"] for r in c["results"]] for p in res["problems"].values() for c in p["cases"]]
    assert statuses == [["passed", "failed"], ["timed out", "failed"], ["failed", "failed"], ["passed"]]
    assert res["statuses"] == {"passed": 2, "failed": 4, "timed_out": 1, "sandbox_error": 0}
    assert res["problems"]["1"]["pass_rate"] == 0.25 and res["problems"]["3"]["pass_rate"] == 1.0
    assert res["pass_rate"] == pytest.approx((0.25 + 0 + 1) / 3)
    errors = [r["error"] for p in res["problems"].values() for c in p["cases"] for r in c["results"]]
    assert "last printed value 'abc' != expected 'ABC'" in errors[1]
    assert "exited 0 before the end" in errors[3]
    assert "printed nothing" in errors[4]
    with pytest.raises(ValueError, match="unknown problem / test case"):
        mtpb.evaluate([{"id": "1", "case": 5, "program": ""}], problems)


@pytest.mark.slow
def test_a_bare_print_last_fails_as_in_the_released_scorer():
    # mtpb_exec.py records every print call and reads print_stack[-1]["args"][0]: a last bare print() raises
    # IndexError there, a failure; an earlier one is just another call.
    problems = mtpb.load_problems(DATA, subset=True)
    samples = [
        {"id": "1", "case": 0, "program": 'print("ABC")\nprint()'},
        {"id": "1", "case": 0, "program": 'print()\nprint("ABC")'},
    ]
    res = mtpb.evaluate(samples, problems, limits=Limits(timeout_s=5))
    results = res["problems"]["1"]["cases"][0]["results"]
    assert [r["status"] for r in results] == ["failed", "passed"]
    assert "the last print call has no argument (a bare print())" in results[0]["error"]


@pytest.mark.slow
def test_cli_scores_a_samples_file(tmp_path, capsys):
    from cglab.cli import main

    samples = tmp_path / "samples.jsonl"
    samples.write_text(json.dumps({"id": "3", "case": 0, "program": "xs = [1, 2, 3]\nsum(xs) / len(xs)"}) + "\n")
    assert main(["eval", "mtpb", "--samples", str(samples), "--data-dir", str(DATA.parent)]) == 2
    assert f"{DATA}: 3 MTPB problems" in capsys.readouterr().err  # not the published file, and not said to be
    assert main(["eval", "mtpb", "--samples", str(samples), "--data-dir", str(DATA.parent), "--mtpb-subset"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["pass_rate"] == 1.0 and res["statuses"]["passed"] == 1
    assert main(["eval", "mtpb", "--samples", str(samples), "--data-dir", str(tmp_path)]) == 2
    assert f"expected {tmp_path / 'mtpb.jsonl'}" in capsys.readouterr().err
    shutil.copy(DATA, tmp_path / "mtpb.jsonl")
    samples.write_text('{"id": "3", "program": "x"}\n')
    assert main(["eval", "mtpb", "--samples", str(samples), "--data-dir", str(tmp_path), "--mtpb-subset"]) == 2
    assert "samples.jsonl:1" in capsys.readouterr().err


@given(
    st.lists(
        st.sampled_from(["x = 1", "\n", "#", "print(x)", "def f():", "    ", "'''", '"""', "<|endoftext|>", "y"]),
        max_size=30,
    ).map("".join)
)
@settings(max_examples=300, deadline=None)
def test_stopping_early_at_the_stops_keeps_what_truncate_keeps(text):
    # Generation stops at STOPS; truncate must give the same code as on the whole budget's text.
    from cglab.eval.generate import cut_at_stop

    assert mtpb.truncate(cut_at_stop(text, mtpb.STOPS)[0]) == mtpb.truncate(text)
