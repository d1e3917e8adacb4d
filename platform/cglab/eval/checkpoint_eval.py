"""Evaluate a cglab checkpoint: the metrics the lessons decide on. The last step of every trial
(`cglab.tune.evaluate`) and the periodic evaluation while training (`cglab.eval.periodic`) both score with the
pieces here (`text_metrics`, `pass_at_1`), so a curve's points and its final value are the same measurement.

    eval/nl_ppl, eval/nl_bpb       held-out natural language (perplexity per token, bits per UTF-8 byte)
    eval/code_ppl, eval/code_bpb   held-out code
    eval/infill_ppl, eval/infill_bpb
                                   perplexity (and bits per UTF-8 byte of the middle) of `middle <eom>` given
                                   the CodeGen2 infill prompt on held-out code
                                   (`cglab.eval.infill.infill_perplexity`); a prefix-LM (lesson 1) reads the
                                   prompt through `<sep>` bidirectionally, as its span-corruption samples were
                                   read in training
    eval/humaneval_pass_at_1       pass@1, when "humaneval" is in eval.suites (first eval.limit problems)
    eval/humaneval_infill_pass_at_1
                                   pass@1, when "infill" is in eval.suites (single-line HumanEval-Infill)
                                   ("_at_": MLflow rejects "@" in a metric name, and the whole batch with it)

Every pass@k comes with its conditions: `eval/<suite>_passed`, `_failed`, `_timed_out`, `_sandbox_error`
(programs per sandbox status; <suite> is humaneval or humaneval_infill) and the tag `eval/<suite>_isolation`
(`cglab.eval.sandbox.isolation_mode()`). Every evaluation is tagged with the texts it scored: `eval.texts`
(heldout | builtin | partial) and `eval.heldout` (e.g. `nl:heldout,code:builtin`). Built-in texts
(`cglab.eval.nl.builtin_texts`, possibly in the training data) are used for a kind only when it has no held-out
documents and `eval.allow_builtin_texts` is set; otherwise that is a ConfigError.

The sampling suites (HumanEval, HumanEval-Infill) decode left-to-right with HF's KV cache for every variant,
prefix-LM included: only the infill score reads its prompt as a prefix.

Scoring windows are `data.seq_length` long: the model never saw positions beyond it in training, and every
variant of a lesson is scored the same way.
"""

from __future__ import annotations

import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping, Sequence

from cglab import storage
from cglab.config import CGLabConfig, ConfigError
from cglab.eval import humaneval, infill, nl
from cglab.eval.generate import load_generator
from cglab.eval.infill import infill_examples, infill_perplexity
from cglab.eval.sandbox import Limits
from cglab.track import timeline
from cglab.train.checkpoint import checkpoint_to_hf


@dataclass
class CheckpointEval:
    """What `evaluate_checkpoint` measured (numbers, for metrics) and under which conditions (strings, for tags):
    the texts each kind was scored on, and the sandbox isolation behind each pass@k."""

    metrics: dict[str, float] = field(default_factory=dict)
    tags: dict[str, str] = field(default_factory=dict)
    timeline: str = "[]"  # where the evaluation's time went (cglab.track.timeline), handed back with the result


def text_sources(nl_path: str | None, code_path: str | None, allow_builtin: bool, why: str = "") -> dict[str, str]:
    """Which texts each kind is scored on: {"nl": "heldout" | "builtin", "code": ...}. A kind without held-out
    documents falls back to `cglab.eval.nl.builtin_texts` only when `allow_builtin` (eval.allow_builtin_texts):
    those texts may be in the training data, and a lesson would rank its variants on memorised text.
    `why`: what kept the held-out documents away, for the error message."""
    used = {"nl": "heldout" if nl_path else "builtin", "code": "heldout" if code_path else "builtin"}
    missing = [k for k, v in used.items() if v == "builtin"]
    if missing and not allow_builtin:
        raise ConfigError(
            f"eval.allow_builtin_texts: no held-out {' or '.join(missing)} documents to evaluate on"
            f"{f' ({why})' if why else ''}. They are sampled from the prepared corpus with eval.holdout "
            f"(cglab.data.heldout: pile sources give NL, stack sources code); add such sources, or set "
            f"eval.allow_builtin_texts=true to score {' and '.join(missing)} on cglab.eval.nl.builtin_texts "
            f"(stdlib docstrings, HumanEval solutions: possibly in the training data)"
        )
    return used


def text_tags(used: Mapping[str, str]) -> dict[str, str]:
    """Tags saying which texts a run was scored on: eval.texts (heldout | builtin | partial) and eval.heldout
    (per kind, e.g. "nl:heldout,code:builtin")."""
    kinds = set(used.values())
    return {
        "eval.texts": kinds.pop() if len(kinds) == 1 else "partial",
        "eval.heldout": ",".join(f"{k}:{v}" for k, v in used.items()),
    }


def sandbox_conditions(suite: str, result: Mapping, prefix: str = "eval") -> CheckpointEval:
    """The conditions of one pass@k result (`humaneval.evaluate`, `infill.evaluate`): programs per sandbox
    status as metrics <prefix>/<suite>_{passed,failed,timed_out,sandbox_error}, the isolation mode as the tag
    <prefix>/<suite>_isolation."""
    return CheckpointEval(
        {f"{prefix}/{suite}_{status}": float(n) for status, n in result["statuses"].items()},
        {f"{prefix}/{suite}_isolation": str(result["isolation"])},
    )


def hf_generator(checkpoint: str | Path, hf_dir: str | Path, seq_length: int):
    """A Generator over the checkpoint (full or model-only) converted to HF in `hf_dir`, scoring in windows of
    `seq_length` (the length the model was trained on)."""
    gen = load_generator(checkpoint_to_hf(checkpoint, hf_dir), batch_size=8)
    gen.max_len = seq_length
    return gen


def text_metrics(gen, cfg: CGLabConfig, nl_path: str | None, code_path: str | None, used: Mapping[str, str]):
    """eval/{nl,code,infill}_{ppl,bpb} on the held-out documents (or, per `used`, the built-in texts): every
    held-out document of each kind (each at most data.seq_length tokens, cglab.data.heldout), or the first
    eval.score_docs of them."""
    out: dict[str, float] = {}
    fallback = nl.builtin_texts(cfg.eval.limit or 64) if "builtin" in used.values() else {}
    n = cfg.eval.score_docs
    nl_texts = nl.read_texts(nl_path, n) if nl_path else fallback["nl"][:n]
    code_texts = nl.read_texts(code_path, n) if code_path else fallback["code"][:n]
    for name, texts in (("nl", nl_texts), ("code", code_texts)):
        m = nl.lm_metrics(gen.score, texts)
        out[f"eval/{name}_ppl"], out[f"eval/{name}_bpb"] = m["perplexity"], m["bits_per_byte"]
    fill = infill_perplexity(
        gen,
        infill_examples(code_texts, seed=cfg.data.seed),
        cfg.data.seq_length,
        prefix_lm=cfg.model.architecture == "prefix_lm",
    )
    out["eval/infill_ppl"], out["eval/infill_bpb"] = fill["perplexity"], fill["bits_per_byte"]
    return out


def pass_at_1(
    gen,
    cfg: CGLabConfig,
    suites: Sequence[str],
    *,
    limit: int | None,
    n: int,
    temperature: float,
    prefix: str = "eval",
) -> CheckpointEval:
    """pass@1 of the suites ("humaneval", "infill": single-line HumanEval-Infill) on their first `limit` tasks,
    in the sandbox with eval.timeout_s per program: <prefix>/<suite>_pass_at_1 with its conditions
    (`sandbox_conditions`)."""
    ev = cfg.eval
    limits = Limits(timeout_s=ev.timeout_s)
    scored: list[tuple[str, dict]] = []
    if "humaneval" in suites:
        problems = dict(list(humaneval.load_problems().items())[:limit])
        samples = humaneval.generate_samples(
            gen, problems, n=n, temperature=temperature, top_p=ev.top_p, max_new_tokens=ev.max_new_tokens
        )
        scored.append(("humaneval", humaneval.evaluate(samples, problems, limits=limits)))
    if "infill" in suites:
        r = infill.evaluate(
            gen,
            "single",
            limit=limit,
            n=n,
            temperature=temperature,
            top_p=ev.top_p,
            max_new_tokens=ev.max_new_tokens,
            limits=limits,
        )
        scored.append(("humaneval_infill", r))
    res = CheckpointEval()
    for suite, r in scored:
        res.metrics[f"{prefix}/{suite}_pass_at_1"] = r["pass@1"]
        cond = sandbox_conditions(suite, r, prefix)
        res.metrics.update(cond.metrics)
        res.tags.update(cond.tags)
    return res


def evaluate_checkpoint(
    checkpoint: str | Path, cfg: CGLabConfig, nl_path: str | None, code_path: str | None
) -> CheckpointEval:
    """Metrics of one trained checkpoint (a cglab checkpoint dir: local, or a storage URI fetched to this node), keyed
    as the lessons expect, and the tags of
    their conditions (texts used per kind, sandbox isolation). A kind whose held-out path is None is scored on
    the built-in texts only if cfg.eval.allow_builtin_texts (else ConfigError, before any work)."""
    if checkpoint is None:
        raise ValueError("evaluate_checkpoint: the training run returned no checkpoint")
    timeline.begin("eval", "eval entry")
    ev = cfg.eval
    used = text_sources(nl_path, code_path, ev.allow_builtin_texts)
    hf_dir = Path(tempfile.mkdtemp(prefix="cglab-eval-hf-"))
    try:
        with storage.local_copy(checkpoint) as local:
            gen = hf_generator(local, hf_dir, cfg.data.seq_length)  # score in windows the model was trained on
        timeline.mark("eval model ready")
        res = CheckpointEval(metrics=text_metrics(gen, cfg, nl_path, code_path, used), tags=text_tags(used))
        codes = pass_at_1(gen, cfg, ev.suites, limit=ev.limit, n=ev.n_samples, temperature=ev.temperature)
        res.metrics.update(codes.metrics)
        res.tags.update(codes.tags)
        timeline.mark("eval end")
        res.timeline = timeline.hand_back()
        return res
    finally:
        shutil.rmtree(hf_dir, ignore_errors=True)
