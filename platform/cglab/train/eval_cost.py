"""Evaluation while training, planned: where its task runs, what one evaluation costs, whether due evaluations are
skipped, and how long the end of a run waits for the last one (issue 27, item 3).

The task (cglab.eval.periodic) runs on CPU: `task_resources` is what it asks Ray for, here and when it is submitted,
eval.task_cpus CPUs and no GPU (a run's GPUs are its Train workers'). One evaluation is the held-out text metrics
(eval.every) and/or pass@1 on the fixed subset (eval.code_every), each modelled as seconds = T * (a + k * N) on
one torch thread, N the parameters as the plan counts them (cglab.train.budget), T the token positions the model's
forwards see, a and k fitted on this machine by benchmarks/eval_cost.py (benchmarks/results/eval_cost.txt):

- text: the held-out NL and code tokens scored (per kind eval.heldout_tokens, or the split's own count when it was
  drawn before, or eval.score_docs documents of the kind's mean length, at most data.seq_length each), plus the
  infill score's batches, padded to data.seq_length, one per code document;
- code: 2 suites x eval.code_limit problems x eval.max_new_tokens generated (an upper bound: a trained model stops
  earlier), plus the sandbox's seconds per program.

The threads divide it (eval.task_cpus; assumed linear, measured at one thread). Not counted: fetching the snapshot
and converting it to HF, attention's share of the forward at long sequences (~10% at 1B, seq 2048). An ESTIMATE: the
end of a completed run waits for the evaluation in flight at most END_WAIT_FACTOR times it plus END_WAIT_FLOOR_S,
unless eval.end_wait_s sets the bound; on GPU the plan says what that wait can cost in idle GPU-hours.
"""

from __future__ import annotations

import math

from cglab.config import CGLabConfig

# fitted by benchmarks/eval_cost.py --repeats 3 (benchmarks/results/eval_cost.txt, its run at 16:07 UTC on 2026-12-07:
# this 2-core machine, shared, one torch thread): seconds = T * (a + k * N)
TEXT_S_PER_TOKEN, TEXT_S_PER_PARAM_TOKEN = 6.5e-05, 3.3e-11  # scoring (text_metrics)
GEN_S_PER_TOKEN, GEN_S_PER_PARAM_TOKEN = 3.2e-04, 3.5e-10  # greedy decoding, batch 8 (pass@1's model time)
SANDBOX_S_PER_PROGRAM = 0.09  # one HumanEval program in the sandbox
CODE_SUITES = 2  # humaneval and single-line infill (cglab.eval.periodic.CODE_SUITES)
END_WAIT_FACTOR = 2.0  # the end waits this many estimated evaluations: the estimate is rough, its machine shared
END_WAIT_FLOOR_S = 120.0  # plus this: what the estimate leaves out (snapshot fetch, HF conversion, the task's start)
KINDS = (("nl", "pile"), ("code", "stack"))  # the held-out kinds and the source kinds they are drawn from


def task_resources(cfg: CGLabConfig) -> dict[str, float]:
    """What the evaluation task asks Ray for: eval.task_cpus CPUs, no GPU (the run's GPUs are its workers')."""
    return {"num_cpus": float(cfg.eval.task_cpus), "num_gpus": 0.0}


def text_tokens(cfg: CGLabConfig, sources: list[dict] | None = None, heldout: dict | None = None) -> dict:
    """Token positions one text evaluation forwards, per part. `sources`: the plan's data.sources entries (their
    kind and tokens_per_document); `heldout`: the drawn split's counts ({"nl": {"documents", "tokens"}, ...})."""
    ev, S = cfg.eval, cfg.data.seq_length
    out: dict[str, int] = {}
    for kind, source_kind in KINDS:
        counts = (heldout or {}).get(kind)
        if isinstance(counts, dict) and counts.get("documents"):
            docs, tokens = counts["documents"], counts["tokens"]
            per_doc = tokens / docs
        else:  # not drawn yet: the budget, in documents of the kind's mean length (full windows when unknown)
            lengths = [e["tokens_per_document"] for e in sources or [] if e["kind"] == source_kind]
            per_doc = min(S, sum(lengths) / len(lengths)) if lengths and sum(lengths) else S
            docs = min(ev.max_docs, math.ceil(ev.heldout_tokens / per_doc))
        if ev.score_docs is not None:
            docs = min(docs, ev.score_docs)
        out[kind] = round(docs * per_doc)
        if kind == "code":
            out["infill"] = docs * S  # one infill example per code document, its batch padded to seq_length
    return out


def estimate(cfg: CGLabConfig, params: int, sources: list[dict] | None = None, heldout: dict | None = None) -> dict:
    """Seconds of one evaluation's text part (eval.every) and code part (eval.code_every) on the task's CPUs."""
    ev = cfg.eval
    threads = max(1, int(ev.task_cpus))
    out: dict = {}
    if ev.every:
        tokens = text_tokens(cfg, sources, heldout)
        out["text_tokens"] = tokens
        out["text_s"] = sum(tokens.values()) * (TEXT_S_PER_TOKEN + TEXT_S_PER_PARAM_TOKEN * params) / threads
    if ev.code_every:
        programs = CODE_SUITES * ev.code_limit
        out["generated_tokens"] = programs * ev.max_new_tokens
        gen_s = out["generated_tokens"] * (GEN_S_PER_TOKEN + GEN_S_PER_PARAM_TOKEN * params) / threads
        out["code_s"] = gen_s + programs * SANDBOX_S_PER_PROGRAM
    out["seconds"] = out.get("text_s", 0.0) + out.get("code_s", 0.0)  # a step due for both
    return out


def end_wait_s(cfg: CGLabConfig, estimate_s: float) -> float:
    """How long the end of a completed run waits for the evaluation in flight: eval.end_wait_s when set, else
    END_WAIT_FACTOR estimated evaluations plus END_WAIT_FLOOR_S."""
    if cfg.eval.end_wait_s is not None:
        return float(cfg.eval.end_wait_s)
    return round(END_WAIT_FACTOR * estimate_s + END_WAIT_FLOOR_S, 1)


def periodic_eval_plan(
    cfg: CGLabConfig,
    params: int,
    step_s: float | None,
    warnings: list[str],
    sources: list[dict] | None = None,
    heldout: dict | None = None,
) -> dict:
    """The plan's `periodic_eval` section: placement, estimate, the interval between due evaluations (when the plan
    has a step time), whether due evaluations will be skipped, and the end wait's bound."""
    ev = cfg.eval
    if not ev.periodic:
        return {"enabled": False}
    res = task_resources(cfg)
    est = estimate(cfg, params, sources, heldout)
    out: dict = {
        "enabled": True,
        "placement": f"CPU: a Ray task of {res['num_cpus']:g} CPU(s) (eval.task_cpus, its torch threads), no GPU, "
        "outside the run's placement group"
        + ("; the run's GPUs are all its Train workers'" if cfg.parallel.use_gpu else ""),
        "resources": res,
        "estimate_s": round(est["seconds"], 1),
        **{k: round(v, 1) if isinstance(v, float) else v for k, v in est.items() if k != "seconds"},
        "method": f"ESTIMATE: T x ({TEXT_S_PER_TOKEN:.1e} + {TEXT_S_PER_PARAM_TOKEN:.1e} x N) s scoring, "
        f"({GEN_S_PER_TOKEN:.1e} + {GEN_S_PER_PARAM_TOKEN:.1e} x N) s per generated token, "
        f"{SANDBOX_S_PER_PROGRAM:g} s per sandboxed program, on one CPU thread "
        "(benchmarks/results/eval_cost.txt), divided by the threads; snapshot fetch and HF conversion not counted",
    }
    every = min(x for x in (ev.every, ev.code_every) if x)
    if step_s:
        interval = every * step_s
        due = max(1, math.ceil(est["seconds"] / interval))
        out["interval_s"], out["due_per_evaluation"] = round(interval, 1), due
        if due > 1:
            warnings.append(
                f"eval.every={ev.every}, eval.code_every={ev.code_every}: one evaluation takes ~{est['seconds']:,.0f} "
                f"s on {res['num_cpus']:g} CPU(s) (an ESTIMATE, periodic_eval), evaluations are due every "
                f"~{interval:,.0f} s: {due - 1} of every {due} due evaluations will be skipped; raise eval.every / "
                f"eval.code_every or eval.task_cpus, or lower eval.score_docs / eval.heldout_tokens / eval.code_limit"
            )
    else:
        out["interval_s"] = "unknown: the plan has no step time for this run (CPU)"
    out["end_wait_s"] = end_wait_s(cfg, est["seconds"])
    out["end_wait_from"] = (
        "eval.end_wait_s" if ev.end_wait_s is not None else f"{END_WAIT_FACTOR:g} x estimate_s + {END_WAIT_FLOOR_S:g} s"
    )
    if cfg.parallel.use_gpu:  # the run's GPUs idle while its end waits (eval.end_wait_s caps it)
        out["end_wait_gpu_hours"] = round(out["end_wait_s"] * cfg.world_size / 3600, 2)
    return out
