"""The periodic evaluation's CPU cost per parameter, measured: what `cglab plan` estimates an evaluation with.

    PYTHONPATH=platform python benchmarks/eval_cost.py [--seq 256] [--docs 32] [--threads 1] [--repeats 2]

Times, at three tiny CodeGen shapes (random init, a BPE trained on HumanEval), on one process and `--threads` torch
threads (the evaluation task's eval.task_cpus=1 by default), each part `--repeats` times after a warm-up, the
fastest kept (this machine is shared):

- the held-out text metrics, `cglab.eval.checkpoint_eval.text_metrics` (what the periodic task and a trial's final
  evaluation call: eval/{nl,code,infill}_{ppl,bpb}), on the built-in texts (`--docs` per kind), counting every token
  position the model's forward passes see (a forward pre-hook: the infill batches' padding included);
- greedy generation, `HFGenerator.generate` on `--docs`/4 HumanEval prompts (the pass@1 part's model time), counting
  the positions generated;
- the sandbox: `cglab.eval.humaneval.evaluate` on 4 canonical solutions (seconds per program).

It fits seconds = a * T + k * N * T per part (N: the parameters as the plan counts them, `cglab.train.budget`; T:
tokens), prints the table and the fit, and appends both to benchmarks/results/eval_cost.txt. The plan's constants
(`cglab.train.eval_cost`) are copied from that file.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform as pf
import subprocess
import time
from pathlib import Path

import numpy as np

SHAPES = ((128, 2), (256, 4), (512, 4))  # (hidden, layers): ~0.5M, ~3.6M, ~13M parameters
RESULT = Path(__file__).parent / "results" / "eval_cost.txt"


def _tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from cglab.data.contract import EOT
    from cglab.eval.humaneval import load_problems

    specials = [EOT, "<sep>", "<eom>", "<pad>"] + [f"<mask_{i}>" for i in range(1, 9)]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    corpus = [p["prompt"] + p["canonical_solution"] for p in load_problems().values()]
    tok.train_from_iterator(
        corpus,
        trainers.BpeTrainer(
            vocab_size=1024, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
        ),
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token=EOT, pad_token=EOT, additional_special_tokens=specials[1:]
    )


def _generator(fast, hidden: int, layers: int, seq: int):
    import torch
    from transformers import CodeGenForCausalLM

    from cglab.config import ModelConfig
    from cglab.eval.generate import HFGenerator
    from cglab.model.hf_convert import hf_config
    from cglab.train.budget import parameters

    m = ModelConfig(
        hidden_size=hidden,
        num_layers=layers,
        num_attention_heads=max(2, hidden // 64),
        rotary_dim=16,
        vocab_size=len(fast),
        max_position_embeddings=seq,
    )
    torch.manual_seed(0)
    gen = HFGenerator(
        CodeGenForCausalLM(hf_config(m, fast.eos_token_id, fast.eos_token_id)), fast, batch_size=8, device="cpu"
    )
    gen.max_len = seq
    return gen, parameters(m)["total"]


def _counted(gen):
    """A list whose [0] counts the token positions the model's forwards see."""
    seen = [0]

    def hook(_mod, args, kwargs):
        ids = kwargs.get("input_ids", args[0] if args else None)
        seen[0] += int(ids.numel())

    gen.model.register_forward_pre_hook(hook, with_kwargs=True)
    return seen


def _fit(rows: list[tuple[int, int, float]]) -> tuple[float, float]:
    """(a, k) of seconds = a * T + k * N * T, least squares over (N, T, seconds), neither negative (a negative
    per-token term is noise: k alone through the origin then)."""
    X = np.array([[t, n * t] for n, t, _ in rows], float)
    y = np.array([s for _, _, s in rows], float)
    (a, k), *_ = np.linalg.lstsq(X, y, rcond=None)
    if a < 0 or k < 0:
        a, k = 0.0, float(X[:, 1] @ y / (X[:, 1] @ X[:, 1]))
    return float(a), float(k)


def _best_of(repeats: int, fn) -> float:
    """The fastest of `repeats` timings of fn(): the one the machine's other jobs disturbed least."""
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--docs", type=int, default=32)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args()

    import torch

    from cglab.config import from_dict
    from cglab.eval import humaneval
    from cglab.eval.checkpoint_eval import text_metrics
    from cglab.eval.sandbox import Limits

    torch.set_num_threads(args.threads)
    t_start = time.perf_counter()
    start_load = os.getloadavg()
    fast = _tokenizer()
    cfg = from_dict(
        {},
        [f"data.seq_length={args.seq}", f"eval.limit={args.docs}", "eval.allow_builtin_texts=true"],
    )
    problems = dict(list(humaneval.load_problems().items())[: max(1, args.docs // 4)])
    text_rows, gen_rows, lines = [], [], []
    for hidden, layers in SHAPES:
        gen, n = _generator(fast, hidden, layers, args.seq)
        seen = _counted(gen)
        text_metrics(gen, cfg, None, None, {"nl": "builtin", "code": "builtin"})  # warm-up: first-call costs
        seen[0] = 0
        ts = _best_of(args.repeats, lambda: text_metrics(gen, cfg, None, None, {"nl": "builtin", "code": "builtin"}))
        tt = seen[0] // args.repeats
        prompts = [p["prompt"] for p in problems.values()]
        gs = _best_of(args.repeats, lambda: gen.generate(prompts, max_new_tokens=args.new_tokens))
        gt = len(prompts) * args.new_tokens  # positions decoded (a random model rarely stops early: an upper bound)
        text_rows.append((n, tt, ts))
        gen_rows.append((n, gt, gs))
        lines.append(
            f"d{hidden:<4d} L{layers}  {n:>12,d}  {tt:>12,d}  {ts:>9.2f}  {ts / (n * tt):.3e}"
            f"  {gt:>10,d}  {gs:>8.2f}  {gs / (n * gt):.3e}"
        )
        print(lines[-1], flush=True)
    samples = [{"task_id": t, "completion": p["canonical_solution"]} for t, p in list(problems.items())[:4]]
    t0 = time.perf_counter()
    humaneval.evaluate(samples, {s["task_id"]: problems[s["task_id"]] for s in samples}, limits=Limits(timeout_s=3.0))
    sandbox_s = (time.perf_counter() - t0) / len(samples)
    (a, k), (ga, gk) = _fit(text_rows), _fit(gen_rows)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    now = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
    head = [
        f"# benchmarks/eval_cost.py, commit {commit}, {now}",
        f"# PYTHONPATH=platform python benchmarks/eval_cost.py --seq {args.seq} --docs {args.docs} "
        f"--threads {args.threads} --new-tokens {args.new_tokens} --repeats {args.repeats}",
        f"# machine: {pf.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}, no GPU; {args.threads} torch "
        f"thread(s), one process; load average at start {start_load[0]:.2f}, at end {os.getloadavg()[0]:.2f} "
        "(a shared machine: other jobs may run)",
        f"# the fastest of {args.repeats} timings per part (after a warm-up); text: text_metrics on the built-in "
        f"texts, {args.docs} docs per kind, seq {args.seq}, fp32; T = token positions through the model's forwards "
        "(infill padding included)",
        f"# generate: greedy HFGenerator.generate, {len(problems)} HumanEval prompts, batch 8, {args.new_tokens} new "
        "tokens each; T = positions generated",
        "# shape        parameters   text tokens   text s    s/(N*T)    gen tokens     gen s    s/(N*T)",
    ]
    fit = [
        f"# fit seconds = a*T + k*N*T: text a={a:.3e} s/token k={k:.3e} s/(param*token); "
        f"generate a={ga:.3e} s/token k={gk:.3e} s/(param*token)",
        f"# sandbox: {sandbox_s:.3f} s per HumanEval program (4 canonical solutions, eval.timeout_s=3)",
        f"# script wall time {time.perf_counter() - t_start:.0f} s",
        "",
    ]
    out = "\n".join(head + lines + fit)
    print("\n".join(fit))
    RESULT.parent.mkdir(parents=True, exist_ok=True)
    with RESULT.open("a") as f:
        f.write(out + "\n")


if __name__ == "__main__":
    main()
