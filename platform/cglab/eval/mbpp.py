"""MBPP (Austin et al., 2021, "Program Synthesis with Large Language Models"), scored in our sandbox.

Data: the published `mbpp.jsonl` (google-research/mbpp), one task per line with `task_id`, `text`, `code`,
`test_list`, `test_setup_code` and optionally `challenge_test_list`. It cannot be downloaded here: pass its path.

Protocol (the paper's, which the CodeGen papers follow): test tasks are task_ids 11-510; tasks 2, 3 and 4 are the
three few-shot examples. Each block reads, exactly as the dataset's README gives it,

    You are an expert Python programmer, and here is your task: {text} Your code should pass these tests:\\n\\n
    {tests}\\n[BEGIN]\\n{code}\\n[DONE]

with `{tests}` the task's `test_list` one assert per line and `{code}` its reference code verbatim (the published
code has `\\r\\n` line ends; they are kept). The three example blocks are joined by one newline, and the test
task's block follows, cut after `[BEGIN]\\n`. The model's completion is what it writes before `[DONE]`.

Scoring: `test_setup_code` + completion + the task's asserts (and a last line that proves the asserts were all
reached, see `sandbox.require_end`) run in `cglab.eval.sandbox`; the task passes when the program exits 0.
pass@k is the unbiased estimator, reported with the isolation mode and status counts like `humaneval.evaluate`.
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path
from typing import Mapping, Sequence

from cglab.eval.humaneval import aggregate, json_records, read_jsonl
from cglab.eval.sandbox import Limits, end_marker, isolation_mode, program_end, require_end, run_programs, status_counts

FILE_NAME = "mbpp.jsonl"  # the published name; `cglab eval run --data-dir DIR` reads DIR/mbpp.jsonl
FEWSHOT_IDS = (2, 3, 4)
TEST_IDS = range(11, 511)
BEGIN, DONE = "[BEGIN]", "[DONE]"
STOP = (DONE,)
_FIELDS = {"task_id": int, "text": str, "code": str, "test_list": list, "test_setup_code": str}


def load_tasks(path: str | Path) -> dict[int, dict]:
    """task_id -> task, in file order. A malformed record is an error naming the file and line."""
    path = Path(path)
    tasks: dict[int, dict] = {}
    for where, task in json_records(path):
        if not isinstance(task, dict):
            raise ValueError(f"{where}: an MBPP record is a JSON object, got {type(task).__name__}")
        for name, kind in _FIELDS.items():
            if name not in task:
                raise ValueError(f"{where}: MBPP record has no {name!r} field")
            # bool is an int subclass: a task_id of true is still malformed
            if not isinstance(task[name], kind) or isinstance(task[name], bool):
                raise ValueError(
                    f"{where}: MBPP field {name!r} should be {kind.__name__}, got {type(task[name]).__name__}"
                )
        for name in ("test_list", "challenge_test_list"):
            tests = task.get(name, [])
            if not isinstance(tests, list) or not all(isinstance(t, str) for t in tests):
                raise ValueError(f"{where}: MBPP field {name!r} should be a list of strings")
        if task["task_id"] in tasks:
            raise ValueError(f"{where}: duplicate task_id {task['task_id']}")
        tasks[task["task_id"]] = task
    return tasks


def block(task: Mapping, *, with_code: bool) -> str:
    """One task in the paper's format; with its reference code (a few-shot example) or open after [BEGIN]."""
    head = (
        f"You are an expert Python programmer, and here is your task: {task['text']} "
        f"Your code should pass these tests:\n\n" + "\n".join(task["test_list"]) + f"\n{BEGIN}\n"
    )
    return head + f"{task['code']}\n{DONE}" if with_code else head


def prompt(task: Mapping, shots: Sequence[Mapping]) -> str:
    """The 3-shot prompt: the example blocks, each ending `[DONE]` and a newline, then the open test block."""
    return "".join(block(s, with_code=True) + "\n" for s in shots) + block(task, with_code=False)


def fewshot(tasks: Mapping[int, Mapping], path: str | Path = FILE_NAME) -> list[Mapping]:
    missing = [i for i in FEWSHOT_IDS if i not in tasks]
    if missing:
        raise ValueError(
            f"{path}: the few-shot tasks {list(FEWSHOT_IDS)} are the prompt's examples; "
            f"task_id(s) {missing} are not in the file"
        )
    return [tasks[i] for i in FEWSHOT_IDS]


def test_tasks(tasks: Mapping[int, Mapping], limit: int | None = None) -> dict[int, Mapping]:
    """The test split (task_ids 11-510) present in the file, in file order; the first `limit` of them."""
    ids = [t for t in tasks if t in TEST_IDS]
    return {t: tasks[t] for t in ids[:limit]}


def extract(generated: str) -> str:
    """The completion is what the model wrote before `[DONE]` (the whole text when it never wrote it)."""
    return generated.split(DONE, 1)[0]


def program(task: Mapping, completion: str, *, challenge: bool = False, marker: str = "") -> str:
    tests = task["test_list"] + (task.get("challenge_test_list") or [] if challenge else [])
    return (
        task["test_setup_code"]
        + "\n"
        + completion
        + "\n\n"
        + "\n".join(tests)
        + "\n"
        + (program_end(marker) if marker else "")
    )


def read_samples(path: str | Path) -> list[dict]:
    """Samples JSONL of `{"task_id": int, "completion": str}`; a malformed line names the file and line."""
    return read_jsonl(
        path,
        lambda s: {"task_id": int(s["task_id"]), "completion": str(s["completion"])},
        "a {'task_id', 'completion'} object",
    )


def evaluate(
    samples: Sequence[Mapping],
    tasks: Mapping[int, Mapping],
    *,
    limits: Limits | None = None,
    workers: int | None = None,
    challenge: bool = False,
) -> dict:
    """Score `{"task_id", "completion"}` samples (completions already cut at [DONE]):
    {"pass@k", "n_tasks", "n_samples", "statuses", "isolation", "tasks"}, as `humaneval.evaluate` reports."""
    unknown = sorted({s["task_id"] for s in samples} - set(tasks))
    if unknown:
        raise ValueError(f"unknown MBPP task_id(s) in samples: {unknown[:5]}{' ...' if len(unknown) > 5 else ''}")
    marker = end_marker()
    programs = [program(tasks[s["task_id"]], s["completion"], challenge=challenge, marker=marker) for s in samples]
    results = require_end(run_programs(programs, limits or Limits(timeout_s=10.0), workers=workers), marker)
    per_task: dict[int, list[bool]] = defaultdict(list)
    details: dict[int, list[dict]] = defaultdict(list)
    for s, r in zip(samples, results):
        per_task[s["task_id"]].append(r.passed)
        details[s["task_id"]].append({"status": r.status, "error": r.stderr[-300:] if not r.passed else ""})
    out: dict = aggregate(per_task)
    # As for HumanEval: a sandbox error scores as not passing; only the status counts tell it from a wrong program.
    out.update(
        n_tasks=len(per_task),
        n_samples=len(samples),
        statuses=status_counts(results),
        isolation=results[0].isolation if results else isolation_mode(),
        challenge_tests=challenge,
    )
    out["tasks"] = {str(t): {"n": len(v), "passed": sum(v), "results": details[t]} for t, v in per_task.items()}
    return out


def generate_samples(
    generator,
    tasks: Mapping[int, Mapping],
    shots: Sequence[Mapping],
    *,
    n: int = 1,
    temperature: float = 0.0,
    top_p: float = 0.95,
    max_new_tokens: int = 512,
) -> list[dict]:
    """n completions per task with a `cglab.eval.generate.Generator`, cut at [DONE]."""
    ids = list(tasks)
    outs = generator.generate(
        [prompt(tasks[t], shots) for t in ids],
        n=n,
        temperature=temperature,
        top_p=top_p,
        max_new_tokens=max_new_tokens,
        stop=STOP,
    )
    return [{"task_id": t, "completion": extract(c)} for t, cs in zip(ids, outs) for c in cs]


def run(
    generator,
    path: str | Path,
    *,
    limit: int | None = None,
    temperature: float = 0.0,
    n: int = 1,
    top_p: float = 0.95,
    max_new_tokens: int = 512,
    limits: Limits | None = None,
    workers: int | None = None,
) -> dict:
    """Generate and score the test split of the MBPP file at `path` (its first `limit` test tasks)."""
    tasks = load_tasks(path)
    shots = fewshot(tasks, path)
    chosen = test_tasks(tasks, limit)
    if not chosen:
        raise ValueError(f"{path}: no test tasks (task_ids {TEST_IDS.start}-{TEST_IDS.stop - 1})")
    samples = generate_samples(
        generator, chosen, shots, n=n, temperature=temperature, top_p=top_p, max_new_tokens=max_new_tokens
    )
    return evaluate(samples, chosen, limits=limits, workers=workers)
