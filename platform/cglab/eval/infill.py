"""HumanEval-Infill (Bavarian et al. 2022; used by InCoder, SantaCoder, CodeGen2), derived from HumanEval.

Derivation from each problem's canonical solution, split into lines (newlines kept):
- single-line: each non-blank line in turn is the middle; prefix = prompt + the lines before it, suffix = the
  lines after it. 164 problems give 1033 tasks, exactly the published count.
- multi-line: each contiguous block of lines from non-blank line i through non-blank line j (i <= j, blank
  lines in between included) is the middle. This gives 5815 tasks, exactly the published count (the
  published set therefore includes the one-line blocks).

Prompt (the CodeGen2 released format): `prefix <mask_1> suffix <|endoftext|> <sep> <mask_1>`; the model writes
the middle and ends it with `<eom>` (no line heuristics). A task passes when prefix + middle + suffix, with
HumanEval's tests, runs clean in the sandbox.

The same prompt scores held-out code without sampling (`infill_perplexity`, a lesson trial's `eval/infill_ppl`):
a block of lines of each document is the middle, and the score is the perplexity of `middle <eom>` given it.
"""

from __future__ import annotations

import dataclasses
import math
from collections import defaultdict
from typing import Mapping, Sequence

import numpy as np
import torch

from cglab.data.contract import EOM, MASK, SEP
from cglab.data.contract import EOT as EOS
from cglab.data.contract import infill_prompt as contract_prompt
from cglab.eval.humaneval import load_problems, pass_at_k
from cglab.eval.sandbox import Limits, isolation_mode, run_programs, status_counts
from cglab.model.masks import allowed

PUBLISHED_COUNTS = {"single": 1033, "multi": 5815}


@dataclasses.dataclass(frozen=True)
class InfillTask:
    task_id: str  # "HumanEval/0/single/3" or "HumanEval/0/multi/3-5" (line numbers in the solution)
    problem_id: str
    prefix: str
    middle: str  # the canonical middle
    suffix: str


def derive_tasks(problems: Mapping[str, Mapping], mode: str) -> list[InfillTask]:
    """All infill tasks of `mode` ("single" or "multi") from the problems' canonical solutions."""
    if mode not in PUBLISHED_COUNTS:
        raise ValueError(f"infill mode must be 'single' or 'multi', got {mode!r}")
    tasks = []
    for pid, p in problems.items():
        lines = p["canonical_solution"].splitlines(keepends=True)
        nonblank = [i for i, line in enumerate(lines) if line.strip()]
        spans = (
            [(i, i) for i in nonblank]
            if mode == "single"
            else [(i, j) for a, i in enumerate(nonblank) for j in nonblank[a:]]
        )
        for i, j in spans:
            tasks.append(
                InfillTask(
                    task_id=f"{pid}/{mode}/{i}" if mode == "single" else f"{pid}/{mode}/{i}-{j}",
                    problem_id=pid,
                    prefix=p["prompt"] + "".join(lines[:i]),
                    middle="".join(lines[i : j + 1]),
                    suffix="".join(lines[j + 1 :]),
                )
            )
    return tasks


def infill_prompt(task: InfillTask) -> str:
    return contract_prompt(task.prefix, task.suffix)


def extract_middle(generated: str) -> str:
    """The middle is everything the model wrote before `<eom>` (or EOS, or the end of the budget)."""
    for end in (EOM, EOS):
        generated = generated.split(end, 1)[0]
    return generated


def program(task: InfillTask, middle: str, problem: Mapping) -> str:
    return task.prefix + middle + task.suffix + "\n\n" + problem["test"] + "\n\n" + f"check({problem['entry_point']})\n"


def score_middles(
    tasks: Sequence[InfillTask],
    middles: Sequence[Sequence[str]],
    problems: Mapping[str, Mapping] | None = None,
    *,
    limits: Limits | None = None,
    workers: int | None = None,
) -> dict:
    """Run every (task, middle) in the sandbox; middles[i] are the samples for tasks[i]. Like
    `humaneval.evaluate`, the result carries `isolation` and `statuses` (passed / failed / timed_out /
    sandbox_error) beside pass@k."""
    problems = problems if problems is not None else load_problems()
    flat = [(t, m) for t, ms in zip(tasks, middles) for m in ms]
    results = run_programs(
        [program(t, m, problems[t.problem_id]) for t, m in flat], limits or Limits(timeout_s=10.0), workers=workers
    )
    per_task: dict[str, list[bool]] = defaultdict(list)
    for (t, _), r in zip(flat, results):
        per_task[t.task_id].append(r.passed)
    n_min = min((len(v) for v in per_task.values()), default=0)
    out = {
        f"pass@{k}": float(np.mean([pass_at_k(len(v), sum(v), k) for v in per_task.values()]))
        for k in (1, 10, 100)
        if 0 < k <= n_min
    }
    out.update(
        n_tasks=len(per_task),
        n_samples=len(flat),
        statuses=status_counts(results),
        isolation=results[0].isolation if results else isolation_mode(),
        tasks={t: {"n": len(v), "passed": sum(v)} for t, v in per_task.items()},
    )
    return out


def _check_sentinels(generator) -> None:
    """Fail before generating if the tokenizer would split the sentinels into ordinary text."""
    tok = getattr(generator, "tok", None)
    if tok is None:
        return
    split = [s for s in (MASK, SEP, EOM, EOS) if len(tok(s, add_special_tokens=False)["input_ids"]) != 1]
    if split:
        raise ValueError(
            f"infill: tokenizer has no single token for {split}; it cannot express the CodeGen2 infill format"
        )


def evaluate(
    generator,
    mode: str = "single",
    *,
    limit: int | None = None,
    n: int = 1,
    temperature: float = 0.0,
    top_p: float = 0.95,
    max_new_tokens: int = 128,
    limits: Limits | None = None,
    workers: int | None = None,
) -> dict:
    """Generate middles for HumanEval-Infill `mode` (first `limit` tasks) and score them."""
    _check_sentinels(generator)
    problems = load_problems()
    tasks = derive_tasks(problems, mode)[:limit]
    outs = generator.generate(
        [infill_prompt(t) for t in tasks],
        n=n,
        temperature=temperature,
        top_p=top_p,
        max_new_tokens=max_new_tokens,
        stop=(EOM, EOS),
    )
    result = score_middles(
        tasks, [[extract_middle(o) for o in os_] for os_ in outs], problems, limits=limits, workers=workers
    )
    result["mode"] = mode
    return result


# ------------------------------------------------------------------------------ infill perplexity (held-out code)
@dataclasses.dataclass(frozen=True)
class InfillExample:
    prefix: str
    middle: str
    suffix: str


def infill_examples(
    texts: Sequence[str], seed: int = 0, max_lines: int = 3, context_lines: int = 12
) -> list[InfillExample]:
    """One example per document: a block of 1..max_lines non-blank lines is the middle, with up to
    `context_lines` lines on each side as prefix and suffix. Deterministic for (texts, seed)."""
    rng = np.random.default_rng(seed)
    out = []
    for text in texts:
        lines = text.splitlines(keepends=True)
        nonblank = [i for i, line in enumerate(lines) if line.strip()]
        if len(nonblank) < 3:
            continue
        a = int(rng.integers(1, len(nonblank) - 1))  # keep a non-blank line before and after the middle
        b = min(a + int(rng.integers(0, max_lines)), len(nonblank) - 2)
        i, j = nonblank[a], nonblank[b]
        start = min(max(0, i - context_lines), nonblank[a - 1])
        stop = max(j + 1 + context_lines, nonblank[b + 1] + 1)
        out.append(InfillExample("".join(lines[start:i]), "".join(lines[i : j + 1]), "".join(lines[j + 1 : stop])))
    return out


def infill_ids(tok, ex: InfillExample, max_len: int, max_middle: int = 32) -> tuple[list[int], list[int]]:
    """(prompt ids, target ids) for one example, cut to fit max_len: the middle to max_middle tokens, the
    prefix from the left and the suffix from the right, half the remaining room each."""
    enc = lambda s: tok(s, add_special_tokens=False)["input_ids"]  # noqa: E731
    sp = {s: [tok.convert_tokens_to_ids(s)] for s in (MASK, SEP, EOM, EOS)}
    target = enc(ex.middle)[:max_middle] + sp[EOM]
    room = max_len - len(target) - len(contract_prompt([], [], sp[MASK], sp[EOS], sp[SEP]))  # the sentinels
    pre, suf = enc(ex.prefix), enc(ex.suffix)
    keep_suf = min(len(suf), max(room // 2, room - len(pre)))
    keep_pre = min(len(pre), room - keep_suf)
    return contract_prompt(pre[len(pre) - keep_pre :], suf[:keep_suf], sp[MASK], sp[EOS], sp[SEP]), target


def prefix_lm_mask(prefix_lens: Sequence[int], seq_len: int, dtype):
    """HF additive 4D mask [b, 1, s, s]: causal, plus every key before a row's prefix length visible to all of
    that row's queries (the pairs of `cglab.model.masks.allowed` with a per-row prefix_end: the training mask of a
    prefix-LM for a single-document prompt, whose prefix ends at its <sep>)."""
    ok = allowed(None, torch.tensor(list(prefix_lens)), seq_len, len(prefix_lens)).unsqueeze(1)
    return torch.zeros(ok.shape, dtype=dtype).masked_fill(~ok, torch.finfo(dtype).min)


def infill_perplexity(
    generator, examples: Sequence[InfillExample], max_len: int, batch: int = 16, prefix_lm: bool = False
) -> dict:
    """Perplexity of the middles (and their <eom>) given the infill prompts. prefix_lm: the prompt up to and
    including <sep> is the bidirectional prefix (span corruption's prefix in training: corrupted input + <sep>)."""
    if not examples:
        raise ValueError("infill_perplexity: no examples (held-out code too short)")
    pairs = [infill_ids(generator.tok, ex, max_len) for ex in examples]
    pad = generator.tok.convert_tokens_to_ids(EOS)
    nll, n = 0.0, 0
    with torch.no_grad():
        for b in range(0, len(pairs), batch):
            chunk = pairs[b : b + batch]
            # Right padding to one fixed width: a causal model's earlier positions never see it, and one
            # shape per batch is much faster on CPU than a new shape per example.
            ids = torch.full((len(chunk), max_len), pad, dtype=torch.long)
            for r, (p, t) in enumerate(chunk):
                ids[r, : len(p) + len(t)] = torch.tensor(p + t)
            kwargs = {}
            if prefix_lm:  # the last prompt token (<mask_1>) opens the answer: it stays causal
                dtype = next(generator.model.parameters()).dtype
                kwargs["attention_mask"] = prefix_lm_mask([len(p) - 1 for p, _ in chunk], max_len, dtype).to(
                    generator.device
                )
            logits = generator.model(input_ids=ids.to(generator.device), **kwargs).logits
            logp = torch.log_softmax(logits.float(), -1)
            for r, (p, t) in enumerate(chunk):
                pos = torch.arange(len(p) - 1, len(p) + len(t) - 1)
                nll -= float(logp[r, pos, torch.tensor(t)].sum())
                n += len(t)
    # Bits per byte: the NLL (the middles and their <eom>) over the UTF-8 bytes of the middles as scored (cut to
    # infill_ids' max_middle tokens), the lessons' unit; <eom> has no bytes of its own.
    nbytes = sum(len(generator.tok.decode(t[:-1]).encode("utf-8")) for _, t in pairs)
    return {
        "perplexity": math.exp(nll / n),
        "bits_per_byte": nll / math.log(2) / max(nbytes, 1),
        "tokens": n,
        "bytes": nbytes,
        "examples": len(examples),
    }
