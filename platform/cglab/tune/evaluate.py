"""The last step of every trial: evaluate the trained checkpoint and return the metrics the lessons decide on.

    eval/nl_ppl, eval/nl_bpb       held-out natural language (perplexity per token, bits per UTF-8 byte)
    eval/code_ppl, eval/code_bpb   held-out code
    eval/infill_ppl                perplexity of `middle <eom>` given the CodeGen2 infill prompt
                                   `prefix <mask_1> suffix <|endoftext|> <sep> <mask_1>` on held-out code;
                                   a prefix-LM (lesson 1) reads the prompt through `<sep>` bidirectionally,
                                   as its span-corruption samples were read in training
    eval/humaneval_pass@1          when "humaneval" is in eval.suites (first eval.limit problems)
    eval/humaneval_infill_pass@1   when "infill" is in eval.suites (single-line HumanEval-Infill)

The sampling suites (HumanEval, HumanEval-Infill) decode left-to-right with HF's KV cache for every variant,
prefix-LM included: only the infill score reads its prompt as a prefix.

Scoring windows are `data.seq_length` long: the model never saw positions beyond it in training, and every
variant of a lesson is scored the same way.
"""
from __future__ import annotations

import math
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from cglab.config import CGLabConfig

MASK, SEP, EOM, EOS = "<mask_1>", "<sep>", "<eom>", "<|endoftext|>"
MAX_DOCS, MAX_DOC_CHARS = 32, 3000  # per kind: enough to rank laptop variants, seconds to score on a CPU


@dataclass(frozen=True)
class InfillExample:
    prefix: str
    middle: str
    suffix: str


def infill_examples(texts: Sequence[str], seed: int = 0, max_lines: int = 3, context_lines: int = 12
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
        out.append(InfillExample("".join(lines[start:i]), "".join(lines[i:j + 1]), "".join(lines[j + 1:stop])))
    return out


def infill_ids(tok, ex: InfillExample, max_len: int, max_middle: int = 32) -> tuple[list[int], list[int]]:
    """(prompt ids, target ids) for one example, cut to fit max_len: the middle to max_middle tokens, the
    prefix from the left and the suffix from the right, half the remaining room each."""
    enc = lambda s: tok(s, add_special_tokens=False)["input_ids"]  # noqa: E731
    sp = {s: tok.convert_tokens_to_ids(s) for s in (MASK, SEP, EOM, EOS)}
    target = enc(ex.middle)[:max_middle] + [sp[EOM]]
    room = max_len - len(target) - 4  # <mask_1> <eot> <sep> <mask_1>
    pre, suf = enc(ex.prefix), enc(ex.suffix)
    keep_suf = min(len(suf), max(room // 2, room - len(pre)))
    keep_pre = min(len(pre), room - keep_suf)
    prompt = pre[len(pre) - keep_pre:] + [sp[MASK]] + suf[:keep_suf] + [sp[EOS], sp[SEP], sp[MASK]]
    return prompt, target


def prefix_lm_mask(prefix_lens: Sequence[int], seq_len: int, dtype):
    """HF additive 4D mask [b, 1, s, s]: causal, plus every key before a row's prefix length visible to all of
    that row's queries (the pairs of `cglab.model.masks.allowed`, the training mask of a prefix-LM)."""
    import torch

    from cglab.model.masks import allowed

    ok = allowed(None, torch.tensor(list(prefix_lens)), seq_len, len(prefix_lens)).unsqueeze(1)
    return torch.zeros(ok.shape, dtype=dtype).masked_fill(~ok, torch.finfo(dtype).min)


def infill_perplexity(generator, examples: Sequence[InfillExample], max_len: int, batch: int = 16,
                      prefix_lm: bool = False) -> dict:
    """Perplexity of the middles (and their <eom>) given the infill prompts. prefix_lm: the prompt up to and
    including <sep> is the bidirectional prefix (span corruption's prefix in training: corrupted input + <sep>)."""
    import torch

    if not examples:
        raise ValueError("infill_perplexity: no examples (held-out code too short)")
    pairs = [infill_ids(generator.tok, ex, max_len) for ex in examples]
    pad = generator.tok.convert_tokens_to_ids(EOS)
    nll, n = 0.0, 0
    with torch.no_grad():
        for b in range(0, len(pairs), batch):
            chunk = pairs[b:b + batch]
            # Right padding to one fixed width: a causal model's earlier positions never see it, and one
            # shape per batch is much faster on CPU than a new shape per example.
            ids = torch.full((len(chunk), max_len), pad, dtype=torch.long)
            for r, (p, t) in enumerate(chunk):
                ids[r, :len(p) + len(t)] = torch.tensor(p + t)
            kwargs = {}
            if prefix_lm:  # the last prompt token (<mask_1>) opens the answer: it stays causal
                dtype = next(generator.model.parameters()).dtype
                kwargs["attention_mask"] = prefix_lm_mask([len(p) - 1 for p, _ in chunk], max_len,
                                                          dtype).to(generator.device)
            logits = generator.model(input_ids=ids.to(generator.device), **kwargs).logits
            logp = torch.log_softmax(logits.float(), -1)
            for r, (p, t) in enumerate(chunk):
                pos = torch.arange(len(p) - 1, len(p) + len(t) - 1)
                nll -= float(logp[r, pos, torch.tensor(t)].sum())
                n += len(t)
    return {"perplexity": math.exp(nll / n), "tokens": n, "examples": len(examples)}


def evaluate_checkpoint(checkpoint: str | Path, cfg: CGLabConfig, nl_path: str | None,
                        code_path: str | None) -> dict[str, float]:
    """Metrics of one trained checkpoint (a cglab checkpoint dir), keyed as the lessons expect."""
    from cglab.eval import nl
    from cglab.eval.generate import load_generator
    from cglab.train.checkpoint import checkpoint_to_hf

    if checkpoint is None:
        raise ValueError("evaluate_checkpoint: the training run returned no checkpoint")
    ev, S = cfg.eval, cfg.data.seq_length
    hf_dir = Path(tempfile.mkdtemp(prefix="cglab-eval-hf-"))
    try:
        gen = load_generator(checkpoint_to_hf(checkpoint, hf_dir), batch_size=8)
        gen.max_len = S  # score in windows the model was trained on
        out: dict[str, float] = {}
        fallback = nl.builtin_texts(ev.limit or 64) if not (nl_path and code_path) else {}
        nl_texts = nl.read_texts(nl_path) if nl_path else fallback["nl"]
        code_texts = nl.read_texts(code_path) if code_path else fallback["code"]
        nl_texts, code_texts = ([t[:MAX_DOC_CHARS] for t in ts[:MAX_DOCS]] for ts in (nl_texts, code_texts))
        for name, texts in (("nl", nl_texts), ("code", code_texts)):
            m = nl.lm_metrics(gen.score, texts)
            out[f"eval/{name}_ppl"], out[f"eval/{name}_bpb"] = m["perplexity"], m["bits_per_byte"]
        out["eval/infill_ppl"] = infill_perplexity(gen, infill_examples(code_texts, seed=cfg.data.seed), S,
                                                   prefix_lm=cfg.model.architecture == "prefix_lm")["perplexity"]
        if "humaneval" in ev.suites:
            from cglab.eval import humaneval

            problems = dict(list(humaneval.load_problems().items())[:ev.limit])
            samples = humaneval.generate_samples(gen, problems, n=ev.n_samples, temperature=ev.temperature,
                                                 top_p=ev.top_p, max_new_tokens=ev.max_new_tokens)
            out["eval/humaneval_pass@1"] = humaneval.evaluate(samples, problems)["pass@1"]
        if "infill" in ev.suites:
            from cglab.eval import infill

            res = infill.evaluate(gen, "single", limit=ev.limit, n=ev.n_samples, temperature=ev.temperature,
                                  top_p=ev.top_p, max_new_tokens=ev.max_new_tokens)
            out["eval/humaneval_infill_pass@1"] = res["pass@1"]
        return out
    finally:
        shutil.rmtree(hf_dir, ignore_errors=True)
