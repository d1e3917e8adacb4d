"""MTPB, the Multi-Turn Programming Benchmark of the CodeGen paper (Nijkamp et al., 2022): 115 problems, each a
sequence of natural-language turns; the model writes the program turn by turn with its own earlier turns in view.

Data: the published `mtpb.jsonl` (salesforce/CodeGen, `benchmark/mtpb.jsonl`), one problem per line: `id`, `name`,
`description`, `prompts` (turn texts with `{A}`-style placeholders, filled by `str.format`, so `{{`/`}}` are
literal braces), `inputs` (one dict of placeholder values per test case), `outputs` (the expected final result per
test case), and optionally `category` and `max_gen_length` (tokens per turn; 256 when absent, the released
sampler's default: problems 39-45 of the published file have none). The published file holds 115 problems; a file
with another count is refused (a partial download would otherwise score as the benchmark) unless the caller says
it is a deliberate subset (`subset=True`, `--mtpb-subset`). It cannot be downloaded here.

Protocol, as the paper's released sampler (`mtpb_sample.py`) runs it. For each test case the prompts are filled
with its inputs; the history starts as `PREFIX` and for each turn becomes

    history + "# " + turn text + "\\n"     -> the model writes code, `truncate`d
    history + turn comment + code + "\\n\\n" -> the next turn's history

and the final program is the whole history: every turn's comment and code. Generation stops at two blank lines
or EOS (`STOPS`), two of `truncate`'s terminals: `truncate` keeps the same text from the shorter generation as
from the whole budget. (Its line-start terminals such as `\n#` are not used as stops, since a generator cuts
before a stop string and the kept code would lose the newline `truncate` keeps, changing the next turn's prompt.)

Scoring, with the paper's adjustments (its `mtpb_exec.py`): the program runs in `cglab.eval.sandbox` with `print`
recorded; when its last statement is not a print, one is injected after AST analysis (`inject_print`); the
first argument of the last print call is compared with the expected output by `equivalent` (list and tuple alike,
numbers within 1e-6, numpy/pandas values as lists and scalars). A test case passes when that comparison holds. A
bare `print()` is a print call like any other: when it is the last one, there is no first argument and the case
fails, as in the released scorer (its `print_stack[-1]["args"][0]` raises IndexError, scored as a failure). A
problem's pass rate is the fraction of its (test case, sample) programs that pass; pass@k is the unbiased estimator
per test case with n samples, averaged per problem, then over problems. Every result carries the isolation mode
and the status counts, like `humaneval.evaluate`.
"""

from __future__ import annotations

import ast
import inspect
import json
import re
from collections import defaultdict
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

from cglab.data.contract import EOT as EOS
from cglab.eval.humaneval import KS, json_records, pass_at_k, read_jsonl
from cglab.eval.sandbox import Limits, end_marker, isolation_mode, program_end, require_end, run_programs, status_counts

FILE_NAME = "mtpb.jsonl"  # the published name; `cglab eval run --data-dir DIR` reads DIR/mtpb.jsonl
N_PROBLEMS = 115
PREFIX = "# Import libraries.\n\nimport numpy as np\n\n"  # the released sampler's start of every program
DEFAULT_GEN_LENGTH = 256  # the released sampler's `max_gen_length` default, for records without one
STOPS = ("\n\n\n", EOS)
TOLERANCE = 1e-6


# ------------------------------------------------------------------------------------------------------- data
def load_problems(path: str | Path, *, subset: bool = False) -> list[dict]:
    """The problems, in file order. A malformed record is an error naming the file and line (and the problem); a
    file without the published N_PROBLEMS problems is an error naming the file, unless `subset` (a deliberate
    part of the benchmark, such as the tests' small file)."""
    path = Path(path)
    problems: list[dict] = []
    seen: set[str] = set()
    for where, p in json_records(path):
        if not isinstance(p, dict):
            raise ValueError(f"{where}: an MTPB record is a JSON object, got {type(p).__name__}")
        for name in ("id", "prompts", "inputs", "outputs"):
            if name not in p:
                raise ValueError(f"{where}: MTPB record has no {name!r} field")
        where = f"{where} (problem {p['id']})"
        if not (isinstance(p["prompts"], list) and p["prompts"] and all(isinstance(t, str) for t in p["prompts"])):
            raise ValueError(f"{where}: 'prompts' should be a non-empty list of strings")
        if not (isinstance(p["inputs"], list) and all(isinstance(i, dict) for i in p["inputs"])):
            raise ValueError(f"{where}: 'inputs' should be a list of objects (placeholder -> value)")
        # More outputs than inputs is tolerated: the published file's problem 57 has six outputs for five
        # inputs, and the released sampler zips the two lists, ignoring the extra one. We do the same.
        if not isinstance(p["outputs"], list) or len(p["outputs"]) < len(p["inputs"]):
            raise ValueError(
                f"{where}: 'outputs' should be a list with one expected result per input ({len(p['inputs'])} inputs)"
            )
        for case, inputs in enumerate(p["inputs"]):
            try:
                [t.format(**inputs) for t in p["prompts"]]
            except KeyError as err:
                raise ValueError(f"{where}: inputs[{case}] has no value for placeholder {err}") from err
            except (IndexError, ValueError) as err:  # `{}`, `{0}` or an unmatched brace in a turn text
                raise ValueError(f"{where}: a prompt is not a valid {{name}} template ({err})") from err
        gen_len = p.get("max_gen_length", DEFAULT_GEN_LENGTH)
        if not isinstance(gen_len, int) or isinstance(gen_len, bool) or gen_len < 1:
            raise ValueError(f"{where}: 'max_gen_length' should be a positive integer")
        pid = str(p["id"])
        if pid in seen:
            raise ValueError(f"{where}: duplicate id {pid}")
        seen.add(pid)
        problems.append({**p, "id": pid, "max_gen_length": gen_len, "outputs": p["outputs"][: len(p["inputs"])]})
    if not subset and len(problems) != N_PROBLEMS:
        raise ValueError(
            f"{path}: {len(problems)} MTPB problems, the published file (salesforce/CodeGen benchmark/{FILE_NAME}) "
            f"has {N_PROBLEMS}: a partial or different file; to score a deliberate subset pass --mtpb-subset "
            "(load_problems(..., subset=True))"
        )
    return problems


def turns(problem: Mapping, case: int) -> list[str]:
    """The turn texts of test case `case`: its inputs substituted the released sampler's way, `str.format`
    (a list becomes its Python repr, a string goes in as is)."""
    return [t.format(**problem["inputs"][case]) for t in problem["prompts"]]


def comment(turn: str) -> str:
    return f"# {turn}\n"


# ------------------------------------------------------------------------------------------------ generation
def truncate(completion: str) -> str:
    """The released sampler's cut of one turn's code: before a second top-level `print` or `def`, then at the
    first line starting with `#`, `'''` or `\"\"\"`, at EOS, or at two blank lines."""
    prints = list(re.finditer("^print", completion, re.MULTILINE))
    if len(prints) > 1:
        completion = completion[: prints[1].start()]
    defs = list(re.finditer("^def", completion, re.MULTILINE))
    if len(defs) > 1:
        completion = completion[: defs[1].start()]
    terminals = [re.compile(r, re.MULTILINE) for r in ("^#", re.escape(EOS), "^'''", '^"""', "\n\n\n")]
    cuts = [m.start() for t in terminals if (m := t.search(completion))]
    return completion[: min(cuts)] if cuts else completion


def generate_samples(
    generator,
    problems: Sequence[Mapping],
    *,
    n: int = 1,
    temperature: float = 0.0,
    top_p: float = 0.95,
    max_new_tokens: int | None = None,
) -> list[dict]:
    """Run the multi-turn protocol: for every problem, test case and sample, turn by turn, the model continues
    the history (earlier turn comments and its own earlier code). Samples are `{"id", "case", "sample",
    "program", "turns"}` with `turns` the code written at each turn. Turn i of every dialogue is generated in
    one batched call (per token budget: the problem's `max_gen_length`, unless `max_new_tokens` overrides it)."""
    dialogues = [
        {
            "id": p["id"],
            "case": c,
            "sample": s,
            "turns_text": turns(p, c),
            "history": PREFIX,
            "turns": [],
            "budget": max_new_tokens or p["max_gen_length"],
        }
        for p in problems
        for c in range(len(p["inputs"]))
        for s in range(n)
    ]
    for i in range(max((len(d["turns_text"]) for d in dialogues), default=0)):
        active = [d for d in dialogues if i < len(d["turns_text"])]
        for d in active:
            d["history"] += comment(d["turns_text"][i])
        by_budget: dict[int, list[dict]] = defaultdict(list)
        for d in active:
            by_budget[d["budget"]].append(d)
        for budget, group in by_budget.items():
            outs = generator.generate(
                [d["history"] for d in group],
                n=1,
                temperature=temperature,
                top_p=top_p,
                max_new_tokens=budget,
                stop=STOPS,
            )
            for d, out in zip(group, outs):
                code = truncate(out[0])
                d["turns"].append(code)
                d["history"] += code + "\n\n"
    return [
        {"id": d["id"], "case": d["case"], "sample": d["sample"], "program": d["history"], "turns": d["turns"]}
        for d in dialogues
    ]


# --------------------------------------------------------------------------------------------------- scoring
def _is_print(stmt: ast.stmt) -> bool:
    return (
        isinstance(stmt, ast.Expr)
        and isinstance(stmt.value, ast.Call)
        and isinstance(stmt.value.func, ast.Name)
        and stmt.value.func.id == "print"
    )


def _print_of(value: ast.expr) -> ast.stmt:
    return ast.Expr(ast.Call(func=ast.Name("print", ast.Load()), args=[value], keywords=[]))


def _load(target: ast.expr) -> ast.expr | None:
    """The assigned name(s) as an expression to print: `x` for `x = ...`, `(a, b)` for `a, b = ...`."""
    if isinstance(target, ast.Name):
        return ast.Name(target.id, ast.Load())
    if isinstance(target, (ast.Tuple, ast.List)) and all(isinstance(e, ast.Name) for e in target.elts):
        return ast.Tuple([ast.Name(e.id, ast.Load()) for e in target.elts], ast.Load())
    return None


def inject_print(code: str) -> str:
    """The paper's adjustment: a program whose last statement is not a print gets one, so its final result is
    seen. A last expression `e` becomes `print(e)`; a last assignment to a name `x` (`=`, `+=`, annotated) is
    followed by `print(x)`, which shows the assigned result (the released scorer wrapped the assigned value
    instead, which breaks `x += 1`). Anything else (a loop, a def, a print already) is left as it is, and so is
    code that does not parse: it fails when it runs. The rewritten program is `ast.unparse`d, as there."""
    try:
        tree = ast.parse(code)
    except (SyntaxError, ValueError, MemoryError, RecursionError):
        return code
    if not tree.body or _is_print(tree.body[-1]):
        return code
    last = tree.body[-1]
    if isinstance(last, ast.Expr):
        tree.body[-1] = _print_of(last.value)
    elif isinstance(last, (ast.Assign, ast.AugAssign, ast.AnnAssign)):
        target = last.targets[-1] if isinstance(last, ast.Assign) else last.target
        shown = _load(target)
        if shown is None or (isinstance(last, ast.AnnAssign) and last.value is None):
            return code
        tree.body.append(_print_of(shown))
    else:
        return code
    return ast.unparse(ast.fix_missing_locations(tree))


def equivalent(actual, expected, tol=1e-6):
    """Whether a printed value matches the expected output (a JSON value) with the paper's adjustments: lists and
    tuples alike (at any depth), numbers within `tol`, numpy arrays / scalars and pandas Series as their Python
    lists / scalars; otherwise the printed value is read as the expected type, as the released scorer did (a
    printed 5 matches "5", a bool is compared as text because bool("False") is True). Dict keys compare as text
    (JSON keys are strings). This function also runs inside the sandbox, so it uses only the stdlib."""
    import math  # local: this function's source is also run inside the sandbox program

    if hasattr(actual, "tolist") and not isinstance(actual, (str, bytes)):  # numpy / pandas
        try:
            actual = actual.tolist()
        except Exception:  # noqa: BLE001 - an odd object: compare it as it is
            pass
    if expected is None:
        return actual is None or str(actual) == "None"
    if isinstance(expected, bool):
        return str(actual) == str(expected)
    if isinstance(expected, (int, float)):
        if isinstance(actual, str):
            try:
                actual = float(actual)
            except ValueError:
                return False
        if not isinstance(actual, (int, float)):
            return False
        if isinstance(actual, float) and math.isinf(actual) or isinstance(expected, float) and math.isinf(expected):
            return actual == expected
        return abs(actual - expected) <= tol
    if isinstance(expected, str):
        return str(actual) == expected
    if isinstance(expected, list):
        if isinstance(actual, (str, bytes, dict)) or not hasattr(actual, "__iter__"):
            return False
        actual = list(actual)
        return len(actual) == len(expected) and all(equivalent(a, e, tol) for a, e in zip(actual, expected))
    if isinstance(expected, dict):
        if not hasattr(actual, "items"):
            return False
        actual = {str(k): v for k, v in actual.items()}
        return set(actual) == {str(k) for k in expected} and all(
            equivalent(actual[str(k)], v, tol) for k, v in expected.items()
        )
    return actual == expected


# Runs in the sandbox around the candidate program: every `print` call's arguments are recorded (in the program's
# own globals, as the released scorer did) and the last call's first argument is compared with the expected
# output; a last call without arguments (a bare `print()`) fails, as `print_stack[-1]["args"][0]` does there.
_HARNESS = """import json, sys

{equivalent}

_printed = []
_real_print = print


def _recording_print(*args, **kwargs):
    _printed.append(args)
    return _real_print(*args, **kwargs)


_globals = {{"__name__": "__main__", "print": _recording_print}}
try:
    exec(compile({program!r}, "program.py", "exec"), _globals)
except SystemExit as exit_:
    if exit_.code not in (None, 0):
        raise
if not _printed:
    sys.exit("mtpb: the program printed nothing")
if not _printed[-1]:
    sys.exit("mtpb: the last print call has no argument (a bare print())")
_expected = json.loads({expected!r})
if not equivalent(_printed[-1][0], _expected):
    sys.exit("mtpb: last printed value " + repr(_printed[-1][0])[:200] + " != expected " + repr(_expected)[:200])
"""


def program(code: str, expected, marker: str = "") -> str:
    """The sandbox program that scores one test case's final program against its expected output."""
    return _HARNESS.format(
        equivalent=inspect.getsource(equivalent), program=inject_print(code), expected=json.dumps(expected)
    ) + (program_end(marker) if marker else "")


def read_samples(path: str | Path) -> list[dict]:
    """Samples JSONL of `{"id", "case", "program"}` (what `generate_samples` writes, `turns` optional)."""
    return read_jsonl(
        path,
        lambda s: {**s, "id": str(s["id"]), "case": int(s["case"]), "program": str(s["program"])},
        "an {'id', 'case', 'program'} object",
    )


def evaluate(
    samples: Sequence[Mapping],
    problems: Sequence[Mapping],
    *,
    limits: Limits | None = None,
    workers: int | None = None,
    ks: Sequence[int] = KS,
) -> dict:
    """Score `{"id", "case", "program"}` samples: {"pass_rate", "pass@k", "n_problems", "n_samples",
    "statuses", "isolation", "problems": {id: {"pass_rate", "cases": [...]}}}."""
    by_id = {p["id"]: p for p in problems}
    for s in samples:
        if s["id"] not in by_id or not 0 <= s["case"] < len(by_id[s["id"]]["outputs"]):
            raise ValueError(f"MTPB sample for unknown problem / test case: id {s['id']!r}, case {s['case']}")
    marker = end_marker()
    programs = [program(s["program"], by_id[s["id"]]["outputs"][s["case"]], marker) for s in samples]
    results = require_end(run_programs(programs, limits or Limits(timeout_s=10.0), workers=workers), marker)
    per_case: dict[str, dict[int, list[bool]]] = defaultdict(lambda: defaultdict(list))
    details: dict[str, dict[int, list[dict]]] = defaultdict(lambda: defaultdict(list))
    for s, r in zip(samples, results):
        per_case[s["id"]][s["case"]].append(r.passed)
        details[s["id"]][s["case"]].append({"status": r.status, "error": r.stderr[-300:] if not r.passed else ""})
    rates = {pid: float(np.mean([x for v in cases.values() for x in v])) for pid, cases in per_case.items()}
    out: dict = {"pass_rate": float(np.mean(list(rates.values()))) if rates else 0.0}
    n_min = min((len(v) for cases in per_case.values() for v in cases.values()), default=0)
    for k in ks:
        if 0 < k <= n_min:
            out[f"pass@{k}"] = float(
                np.mean(
                    [np.mean([pass_at_k(len(v), sum(v), k) for v in cases.values()]) for cases in per_case.values()]
                )
            )
    out.update(
        n_problems=len(per_case),
        n_samples=len(samples),
        statuses=status_counts(results),
        isolation=results[0].isolation if results else isolation_mode(),
    )
    out["problems"] = {
        pid: {
            "pass_rate": rates[pid],
            "cases": [
                {"case": c, "n": len(v), "passed": sum(v), "results": details[pid][c]} for c, v in sorted(cases.items())
            ],
        }
        for pid, cases in per_case.items()
    }
    return out


def run(
    generator,
    path: str | Path,
    *,
    limit: int | None = None,
    temperature: float = 0.0,
    n: int = 1,
    top_p: float = 0.95,
    max_new_tokens: int | None = None,
    limits: Limits | None = None,
    workers: int | None = None,
    subset: bool = False,
) -> dict:
    """Generate with the multi-turn protocol and score the first `limit` problems of the MTPB file at `path`
    (`subset`: the file is a deliberate part of the benchmark, see `load_problems`)."""
    problems = load_problems(path, subset=subset)[:limit]
    if not problems:
        raise ValueError(f"{path}: no MTPB problems")
    samples = generate_samples(
        generator, problems, n=n, temperature=temperature, top_p=top_p, max_new_tokens=max_new_tokens
    )
    return evaluate(samples, problems, limits=limits, workers=workers)
