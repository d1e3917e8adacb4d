"""What a run will really do, before it spends anything (`cglab plan` prints it: cglab.plan).

    plan = plan_run(cfg)                       # one run: dict of resolved decisions, warnings and errors

Everything a run decides at start is gathered here, for the machine the run targets (a GPU preset is planned on a
machine without one): the attention backend and why, the fusions, the Adam Megatron will build and whether the
grad-scale fold applies, precision, the parallel layout, resources, the data available (a bounded scan through
the training readers and filters, its method stated) against the data needed, the mask fraction each corrupting
objective realises on that data at the configured sequence length (the real objective code, run on a sample), the
sentinels needed and available, memory per GPU (cglab.train.memory), the run's parameters, tokens per parameter
and expected GPU-hours (cglab.train.budget, an estimate from the measured 1B anchor), and the evaluation while
training: where its task runs, its cost against the interval between due evaluations, and the end wait's bound
(cglab.train.eval_cost). `warnings` are decisions a
researcher should know about; `errors` are what a run refuses. The attention, fusion and Adam entries are the run's own
`cglab.decisions.RunDecisions`, resolved for the target machine. `cglab train`, `jobs/pretrain.py` and every Tune
trial run `plan_run` before any worker starts (cglab.train.trainer.fit), refuse on errors and log the plan as
`plan.json`.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np

from cglab.config import CGLabConfig, ConfigError, cross_field_errors
from cglab.data import artifacts, heldout, objectives, prepared, readers
from cglab.data.dedup import content_hashes
from cglab.data.mixture import interleave, source_weights
from cglab.data.objectives import packing_reserve
from cglab.data.packing import pack_documents
from cglab.data.tokenizer import load_tokenizer
from cglab.train.checkpoint_size import checkpoint_plan, grace_warning
from cglab.train.eval_cost import periodic_eval_plan
from cglab.train.memory import memory_gib, planned_stages

# The bounded data scan: per source, files are read in order until either budget is spent.
SCAN_DOCS, SCAN_BYTES = 4000, 64 << 20
MASK_WINDOWS = 64  # packed windows per corrupting setting for the realised mask fraction
MASK_TOLERANCE = 0.10  # relative: the realised fraction must be within 10% of the mean drawn ratio
GPU_MEMORY_GIB = 80.0  # H100 80GB, the smallest GPU the GPU presets are sized for


# ---------------------------------------------------------------------------------------------- resources
def trial_resources(cfg: CGLabConfig, driver_cpus: float, data_cpus: float = 0.0) -> dict[str, float]:
    """Logical resources one trial needs while it trains: its Train workers, its driver function, the
    headroom its Ray Data tasks run in and, when it evaluates while training (eval.every, eval.code_every), the
    evaluation task's eval.task_cpus: counted here, so the trials `max_concurrent` lets run side by side leave
    room for each one's task."""
    n = cfg.world_size
    task = cfg.eval.task_cpus if cfg.eval.periodic else 0.0
    res = {"CPU": n * cfg.parallel.cpus_per_worker + driver_cpus + data_cpus + task}
    if cfg.parallel.use_gpu:
        res["GPU"] = float(n)
    return res


def max_concurrent(per_trial: dict[str, float], cluster: dict[str, float], n_trials: int) -> int:
    """How many trials fit side by side; more would only start Train runs that wait for resources."""
    fits = []
    for k, need in per_trial.items():
        if need <= 0:
            continue
        have = cluster.get(k, 0.0)
        if have + 1e-9 < need:
            raise ConfigError(
                f"one trial needs {need:g} {k} (parallel.* x workers + driver) but the Ray "
                f"cluster has {have:g}; use a smaller preset or a bigger cluster"
            )
        fits.append(int((have + 1e-9) // need))
    return max(1, min([n_trials, *fits]))


def _resources(cfg: CGLabConfig, driver_cpus: float = 0.0, data_cpus: float = 0.0, n_trials: int = 1) -> dict:
    per = trial_resources(cfg, driver_cpus, data_cpus)
    out: dict[str, Any] = {"per_run": per, "workers": cfg.world_size, "cluster": None, "side_by_side": None}
    cluster = _connected_cluster()
    if cluster is not None:
        out["cluster"] = cluster
        try:
            out["side_by_side"] = max_concurrent(per, cluster, n_trials)
        except ConfigError as err:
            out["side_by_side"] = 0
            out["error"] = str(err)
    return out


def _connected_cluster() -> dict[str, float] | None:
    """The resources of the Ray cluster this process is connected to, or of RAY_ADDRESS; None when there is none
    (plan never starts Ray)."""
    # Ray: kept off `cglab --help`'s path
    import ray

    if not ray.is_initialized():
        if not os.environ.get("RAY_ADDRESS"):
            return None
        try:
            ray.init(address=os.environ["RAY_ADDRESS"], log_to_driver=False)
        except ConnectionError:
            return None
    return {k: float(v) for k, v in ray.cluster_resources().items() if k in ("CPU", "GPU")}


# ---------------------------------------------------------------------------------------------- data
@dataclasses.dataclass
class Scan:
    """What a bounded scan of the configured sources found, per source (by index), and the documents it kept."""

    entries: list[dict]
    docs: list[list[np.ndarray]]  # per source: the kept documents' token ids (each ends with <|endoftext|>)
    tokenizer: Any
    file_bytes: list[list[int]] = dataclasses.field(default_factory=list)  # per source: each file's size
    # the prepared corpus's pieces (source, tokens) when it was built before: the epoch's units are then exact
    pieces: tuple[np.ndarray, np.ndarray] | None = None
    heldout: dict | None = None  # the held-out split's counts (eval.holdout), when it was drawn before


def scan_sources(cfg: CGLabConfig, tokenizer=None, max_docs: int = SCAN_DOCS, max_bytes: int = SCAN_BYTES) -> Scan:
    """Read each source's files in order through the training readers and filters until `max_docs` documents or
    `max_bytes` file bytes, tokenize what is kept with the run's tokenizer, and extrapolate documents and tokens
    to all files by file size (exact when every file was read)."""
    # pyarrow: kept off `cglab --help`'s path
    from cglab.data.filters import filter_reasons

    d = cfg.data
    tok = tokenizer or _tokenizer(cfg)
    limit = readers.max_record_bytes(d.filters.max_chars)
    entries, docs, file_bytes = [], [], []
    for src in readers.resolve_files(d.sources):
        sizes = [_file_size(f) for f in src.files]
        file_bytes.append(sizes)
        read = Counter()
        kept: list[str] = []
        n_files = 0
        for i in range(len(src.files)):
            if n_files and (len(kept) >= max_docs or sum(sizes[:i]) >= max_bytes):
                break
            n_files += 1
            recs = list(readers.read_file(src, i, limit))
            ok = [r.text for r in recs if not r.reason]
            reasons = filter_reasons(ok, d.filters) if ok else np.zeros(0, object)
            read.update([r.reason for r in recs if r.reason] + [x for x in reasons.tolist() if x])
            kept += [t for t, x in zip(ok, reasons.tolist()) if not x]
        flat, offsets = tok.encode_batch(kept) if kept else (np.zeros(0, np.int32), np.zeros(1, np.int64))
        ids = [flat[a:b] for a, b in zip(offsets[:-1], offsets[1:])]
        scanned = sum(sizes[:n_files])
        scale = sum(sizes) / scanned if scanned else 1.0
        exact = n_files == len(src.files)
        dup = len(kept) - len(set(content_hashes(kept)))
        entries.append(
            {
                "name": src.name,
                "kind": src.kind,
                "files": len(src.files),
                "bytes": sum(sizes),
                "scanned": {
                    "files": n_files,
                    "bytes": scanned,
                    "kept": len(kept),
                    "skipped": dict(read),
                    "exact_duplicates": dup,
                },
                "documents": round(len(kept) * scale),
                "tokens": round(int(flat.size) * scale),
                "tokens_per_document": round(flat.size / len(kept), 1) if kept else 0.0,
                "method": (
                    "exact: every file read through the training readers and filters"
                    if exact
                    else f"extrapolated by file size from the first {n_files} of {len(src.files)} files "
                    f"({scanned:,} of {sum(sizes):,} bytes) read through the training readers and filters"
                ),
            }
        )
        docs.append(ids)
    scan = Scan(entries, docs, tok, file_bytes)
    _exact_counts(cfg, scan)
    return scan


def _exact_counts(cfg: CGLabConfig, scan: Scan) -> None:
    """Where the prepared corpus of this config exists (`cglab corpus prepare`, or an earlier run over it), its
    index replaces the scan's extrapolation: documents and tokens per source after filters, dedup and
    decontamination, what each skipped by reason (`duplicate`, `contaminated:<suite>`, ...), the real pieces the
    epoch's units are composed of, and the held-out split when it was drawn. Builds nothing."""
    d = cfg.data
    sources = readers.resolve_files(d.sources)
    path = prepared.find(sources, d.filters, scan.tokenizer, artifacts.cache_root(d), d.chunk_tokens)
    if path is None:
        return
    meta, idx = prepared.read_meta(path), prepared.load_index(path)
    for e in scan.entries:
        m = meta["sources"].get(e["name"], {"documents": 0, "tokens": 0, "skipped": {}})
        e["documents"], e["tokens"] = m["documents"], m["tokens"]
        e["tokens_per_document"] = round(m["tokens"] / m["documents"], 1) if m["documents"] else 0.0
        e["skipped"] = m["skipped"]
        e["method"] = f"exact: the prepared corpus's index ({path})"
    scan.pieces = (idx.source.astype(np.int64), idx.tokens.astype(np.float64))
    if cfg.eval.holdout:
        held = heldout.find(path, cfg.eval, d.seq_length, d.filters.dedup)
        scan.heldout = {"path": held.path, **held.counts} if held else {"note": "drawn when the run starts"}


def _file_size(path: str) -> int:
    fs, p = readers._filesystem(path)
    return int(fs.get_file_info(p).size or 0)


def _tokenizer(cfg: CGLabConfig):
    """The run's tokenizer: loaded from data.tokenizer.path or model.init_from, else the corpus's (data/artifacts.py:
    reused from data.cache_path, or trained and stored there, as `prepare_data` does)."""
    d = cfg.data
    tok = load_tokenizer(cfg)  # data.tokenizer.path, else the tokenizer that came with model.init_from's weights
    return tok or artifacts.trained_tokenizer(d, readers.resolve_files(d.sources), artifacts.cache_root(d))[0]


def _windows(cfg: CGLabConfig, scan: Scan, limit: int) -> tuple[np.ndarray, np.ndarray]:
    """Packed windows of the scanned documents (sources interleaved by their mixture weights with the stream's own
    `interleave`), packed with the objective's reserve at data.seq_length."""
    d = cfg.data
    w = source_weights(d.mixture, [s.kind for s in d.sources], [s.weight for s in d.sources])
    size = (lambda doc: doc.size) if d.mix_by == "tokens" else None
    stream, need = [], limit * d.seq_length
    for _, doc in interleave([iter(x) for x in scan.docs], w, np.random.default_rng(d.seed), size=size):
        stream.append(doc)
        need -= doc.size
        if need <= 0:
            break
    tok, seg = pack_documents(stream, d.seq_length, scan.tokenizer.specials, packing_reserve(cfg.objective))
    return tok[:limit], seg[:limit]


def _mask_fractions(cfg: CGLabConfig, scan: Scan, windows, warnings: list[str]) -> list[dict]:
    """Target (mean drawn ratio) and realised (masked / maskable tokens) of every corrupting setting, measured by
    running cglab.data.objectives.span_corruption on packed windows of the scanned data."""
    o, S = cfg.objective, cfg.data.seq_length
    out = []
    settings = o.corrupting()
    if not settings:
        return out
    tok, seg = windows
    if not len(tok):
        warnings.append("mask_fraction: no data to measure on")
        return out
    sp = scan.tokenizer.specials
    for c in settings:
        if c.spans_needed(S) > len(sp.masks):
            out.append(
                {
                    "objective": c.name,
                    "target": round(c.mean_ratio, 4),
                    "realised": None,
                    "note": "not measured: too few sentinels (see errors)",
                }
            )
            continue
        rngs = [np.random.default_rng([cfg.data.seed, 0, i]) for i in range(len(tok))]
        res = objectives.span_corruption(
            tok, seg, sp, rngs, S, ratio=c.ratio, span_len=c.span_len, file_level=o.corruption == "file_level"
        )
        realised = float(res["n_masked"].sum() / max(1, res["n_maskable"].sum()))
        ok = abs(realised - c.mean_ratio) <= MASK_TOLERANCE * c.mean_ratio
        out.append(
            {
                "objective": c.name,
                "label": c.label,
                "corruption": o.corruption,
                "target": round(c.mean_ratio, 4),
                "realised": round(realised, 4),
                "within_10pct": ok,
                "windows": int(len(tok)),
            }
        )
        if not ok:
            warnings.append(
                f"mask_fraction: {c.label} realises {realised:.3f} of the tokens, its mean drawn "
                f"ratio is {c.mean_ratio:.3f} (data.seq_length={S})"
            )
    return out


def _data(cfg: CGLabConfig, scan: Scan, windows, errors: list[str], warnings: list[str]) -> tuple[dict, dict, dict]:
    """(data, tokens_needed, passes): what the sources hold, what the run reads, and what that implies."""
    d, t = cfg.data, cfg.train
    _, seg = windows
    fill = float((seg >= 0).sum(1).mean()) if len(seg) else float(d.seq_length)
    per_epoch = math.ceil(t.train_steps / t.epochs) * t.global_batch_size
    raw_per_epoch = per_epoch * fill
    w = source_weights(d.mixture, [s.kind for s in d.sources], [s.weight for s in d.sources])
    tpd = np.array([e["tokens_per_document"] for e in scan.entries], float)
    if d.mix_by == "documents":  # a weight is a share of documents: the token share follows their lengths
        share = w * tpd / (w * tpd).sum() if (w * tpd).sum() > 0 else w
    else:
        share = w
    stop = {}
    if t.stop_at != "steps":  # the run's length is a token budget: what it holds equal, and the steps it may take
        stop = {"stop_at": t.stop_at, "token_budget": t.token_budget}
        if t.stop_at == "raw_tokens":
            raw_per_epoch = t.token_budget / t.epochs
            # the plan's windows carry the objective's largest reserve, the stream's only their own part's (a mixed
            # objective's windows hold more): an upper bound
            stop["steps_at_most"] = math.ceil(t.token_budget / (fill * t.global_batch_size))
        else:
            stop["steps"] = "as many as the loss tokens need (data/loss_tokens, data/budget_used per step)"
    needed = {
        **stop,
        "sequence_tokens": t.train_steps * t.global_batch_size * d.seq_length,
        "samples_per_epoch": per_epoch,
        "epochs": t.epochs,
        "raw_tokens_per_window": round(fill, 1),
        "unique_tokens_per_epoch": round(raw_per_epoch),
        # each source's share of the tokens the model trains on (data.mix_by: the weights, or by documents)
        "mix_by": d.mix_by,
        "token_share": {e["name"]: round(float(x), 4) for e, x in zip(scan.entries, share)},
    }
    nl = sum(float(x) for e, x in zip(scan.entries, share) if e["kind"] == "pile")
    if d.mixture == "mix" and d.mix_by == "documents" and not 0.25 <= nl <= 0.75:
        per_doc = ", ".join(f"{e['name']} ~{e['tokens_per_document']:,.0f}" for e in scan.entries)
        warnings.append(
            f"data.mixture: 'mix' takes half the documents from each kind, which is {nl:.0%} natural language by "
            f"tokens with these sources' document lengths ({per_doc} tokens per document); the paper's 50/50 "
            f"is by tokens: data.mix_by=tokens (the default)"
        )
    epoch = _epoch_reads(cfg, scan, w, share, errors)
    needed["epoch_reads"] = epoch
    passes = {}
    for e, s in zip(scan.entries, share):
        if s <= 0:
            continue
        need_s = raw_per_epoch * s
        can = e["tokens"] * epoch["share_read"].get(e["name"], 1.0)  # what an epoch can serve of this source
        passes[e["name"]] = round(t.epochs * need_s / e["tokens"], 3) if e["tokens"] else math.inf
        if need_s > can:
            errors.append(
                f"data: an epoch of train.train_steps={t.train_steps} / train.epochs={t.epochs} reads "
                f"~{need_s:,.0f} tokens of source {e['name']!r}, which holds ~{e['tokens']:,} after "
                f"filters ({e['method'].split(':')[0]}), of which an epoch at "
                f"parallel.data_parallel_size={cfg.parallel.data_parallel_size} can serve ~{can:,.0f} "
                f"(epoch_reads); the stream would run dry. Add data, lower train.train_steps, or raise "
                f"train.epochs to repeat it on purpose"
            )
    if t.epochs == 1 and any(v > 0.999 for v in passes.values()) and not errors:
        warnings.append("data: the run reads nearly all of a source once; dedup or filters may leave too little")
    data = {"sources": scan.entries}
    if cfg.eval.holdout:
        data["heldout"] = scan.heldout or {"note": "drawn when the run starts (cglab.data.heldout)"}
    return data, needed, passes


def _epoch_reads(cfg: CGLabConfig, scan: Scan, w: np.ndarray, share: np.ndarray, errors: list[str]) -> dict:
    """How much of each source one epoch really reads, at the configured DP size.

    Two things leave data unread (cglab.data.pipeline): a unit of work ends when its first source runs dry, which
    keeps the mixture's ratio; and the feed steps every DP rank in lockstep, so an epoch lasts as long as the rank
    with the least data. Both are computed with the stream's own functions (`compose_units`, `balance`) on the
    pieces the prepared corpus will have (each file's tokens, from its size and the source's tokens per byte, cut
    into pieces of data.chunk_tokens), so a run that would run dry is refused before any worker starts."""
    from cglab.data.pipeline import compose_units, owners

    dp, chunk = cfg.parallel.data_parallel_size, cfg.data.chunk_tokens
    active = [i for i in range(len(scan.entries)) if share[i] > 0]
    if scan.pieces is not None:  # the prepared corpus's own pieces
        source, tokens = scan.pieces
    else:  # the pieces it will have: each file's tokens (from its size) cut into data.chunk_tokens
        src_l, tok_l = [], []
        for i in active:
            sizes = np.asarray(scan.file_bytes[i], float)
            per_byte = scan.entries[i]["tokens"] / sizes.sum() if sizes.sum() else 0.0
            for t in sizes * per_byte:
                n = max(1, math.ceil(t / chunk))
                src_l += [i] * n
                tok_l += [t / n] * n
        source, tokens = np.asarray(src_l, np.int64), np.asarray(tok_l)
    members, yields = compose_units(source, tokens, share, cfg.data.seed, 0, cfg.data.unit_tokens)
    n_units = len(members)
    if dp > n_units:
        errors.append(
            f"parallel.data_parallel_size={dp}: the data has only {n_units} units of work (data.unit_tokens, at "
            f"most one per piece of the active source with the fewest pieces), each DP rank needs one; lower "
            f"data.unit_tokens, or data.chunk_tokens for more pieces"
        )
        return {"units": n_units, "dp_size": dp, "share_read": {}}
    per_rank = np.bincount(owners(yields.tolist(), dp), weights=yields, minlength=dp)
    lockstep = float(dp * per_rank.min() / per_rank.sum()) if per_rank.sum() else 0.0
    total = {i: scan.entries[i]["tokens"] for i in active}
    return {
        "units": n_units,
        "dp_size": dp,
        "lockstep_fraction": round(lockstep, 4),
        # a unit emits `yield` tokens, share[i] of them from source i, before its first source runs dry
        "share_read": {
            scan.entries[i]["name"]: round(float(yields.sum() * share[i] / total[i] * lockstep), 4) if total[i] else 0.0
            for i in active
        },
    }


def _sentinels(cfg: CGLabConfig, scan: Scan | None, errors: list[str]) -> dict:
    S = cfg.data.seq_length
    need = {c.name: c.spans_needed(S) for c in cfg.objective.corrupting()}
    have = len(scan.tokenizer.specials.masks) if scan is not None else cfg.data.num_sentinels
    return {
        "needed": max(need.values(), default=0),
        "per_objective": need,
        "available": have,
        "configured": cfg.data.num_sentinels,
    }


# ---------------------------------------------------------------------------------------------- assembly
def plan_run(
    cfg: CGLabConfig,
    *,
    tokenizer=None,
    te: str = "auto",
    scan: Scan | None = None,
    driver_cpus: float = 0.0,
    data_cpus: float = 0.0,
    n_trials: int = 1,
) -> dict:
    """Everything the run `cfg` decides at start, with its warnings and errors (cross-field config errors too)."""
    from cglab.decisions import Machine, RunDecisions  # imports torch: kept off `cglab --help`'s path
    from cglab.train import pretrained

    errors, warnings = list(cross_field_errors(cfg)), []
    target = Machine.target(cfg, te)
    if target.note:
        warnings.append(target.note)
    decisions = RunDecisions.resolve(cfg, target)  # what the run decides at start, on the machine it targets
    if decisions.adam_error:
        errors.append(decisions.adam_error)
    sections = decisions.plan_sections(cfg)
    att = sections["attention_backend"]
    if att["backend"] == "te":
        warnings.append(
            "attention_backend: Transformer Engine has never been measured here (no TE run in "
            "benchmarks/results); its numbers and masks are unverified"
        )
    out: dict[str, Any] = {
        "init_from": pretrained.plan_entry(cfg, errors, warnings),  # where the weights come from
        **sections,
        "precision": cfg.train.precision,
        "parallel": {
            "tp": cfg.parallel.tensor_model_parallel_size,
            "pp": cfg.parallel.pipeline_model_parallel_size,
            "dp": cfg.parallel.data_parallel_size,
            "sequence_parallel": cfg.parallel.sequence_parallel,
            "world_size": cfg.world_size,
            "pipeline_stages": list(planned_stages(cfg)),  # layers on each stage
            "micro_batches_per_step": cfg.train.global_batch_size
            // (cfg.train.micro_batch_size * cfg.parallel.data_parallel_size),
        },
        "resources": _resources(cfg, driver_cpus, data_cpus, n_trials),
    }
    if scan is None and cfg.data.sources:
        try:
            scan = scan_sources(cfg, tokenizer)
        except ConfigError as err:
            errors.append(str(err))
    if scan is not None:
        vocab = scan.tokenizer.vocab_size
        if vocab > cfg.model.vocab_size:
            errors.append(
                f"data.tokenizer.vocab_size: the tokenizer has {vocab} tokens, more than "
                f"model.vocab_size={cfg.model.vocab_size}"
            )
        elif vocab < 0.9 * cfg.model.vocab_size:
            warnings.append(
                f"data.tokenizer: {vocab} tokens for model.vocab_size={cfg.model.vocab_size}: "
                f"{cfg.model.vocab_size - vocab} embedding rows are never trained"
            )
        windows = _windows(cfg, scan, MASK_WINDOWS)
        out["data"], out["tokens_needed"], out["passes"] = _data(cfg, scan, windows, errors, warnings)
        out["mask_fraction"] = _mask_fractions(cfg, scan, windows, warnings)
    else:
        out["data"], out["tokens_needed"], out["passes"], out["mask_fraction"] = None, None, None, None
        warnings.append("data: no data.sources configured; nothing to scan")
    out["sentinels"] = _sentinels(cfg, scan, errors)
    out["memory_gb"] = memory_gib(cfg, att["backend"], decisions.model.recompute)
    if target.cuda and out["memory_gb"]["total"] > GPU_MEMORY_GIB:
        warnings.append(
            f"memory_gb: ~{out['memory_gb']['total']:.0f} GiB per GPU estimated, more than an "
            f"H100's {GPU_MEMORY_GIB:.0f} GB; lower train.micro_batch_size, raise TP/PP, or set model.recompute=full"
        )
    # imports torch (cglab.train.flops): kept off `cglab --help`'s path
    from cglab.train.budget import budget

    out["budget"] = budget(cfg, decisions.model.recompute.granularity or "none")
    tps = out["budget"].get("tokens_per_s")
    step_s = cfg.train.global_batch_size * cfg.data.seq_length / tps if tps else None  # the budget's estimate
    size = checkpoint_plan(
        cfg, out["memory_gb"]["params_per_gpu"], out["budget"]["parameters"]["total"], decisions.async_save, step_s
    )
    out["checkpoint_size"] = size
    if (w := grace_warning(size)) is not None:
        warnings.append(w)
    out["periodic_eval"] = periodic_eval_plan(
        cfg,
        out["budget"]["parameters"]["total"],
        step_s,
        warnings,
        sources=(out["data"] or {}).get("sources"),
        heldout=(out["data"] or {}).get("heldout"),
    )
    out["warnings"], out["errors"] = warnings, errors
    return out


def refuse(plan: dict, what: str = "run") -> None:
    """Raise ConfigError listing the plan's errors (what a run refuses), if any."""
    if plan["errors"]:
        raise ConfigError(
            f"the {what} would be refused (`cglab plan` shows the whole plan):\n  " + "\n  ".join(plan["errors"])
        )


# ---------------------------------------------------------------------------------------------- printing
def text(plan: dict) -> str:
    """A plan as an indented table a person reads top to bottom."""
    if "trials" in plan:
        head = [
            f"lesson {plan['lesson']} ({plan['experiment']}), preset {plan['preset']}: {len(plan['trials'])} trials"
        ]
        body = [
            f"\n== {t['variant']} seed {t['seed']}\n"
            + text({k: v for k, v in t.items() if k not in ("variant", "seed")})
            for t in plan["trials"]
        ]
        return "\n".join(head + body)
    lines = []
    for key, value in plan.items():
        lines += _lines(key, value, 0)
    return "\n".join(lines)


def _lines(key: str, value: Any, depth: int) -> list[str]:
    pad = "  " * depth
    if isinstance(value, dict):
        if not value:
            return [f"{pad}{key}: none"]
        out = [f"{pad}{key}:"]
        for k, v in value.items():
            out += _lines(str(k), v, depth + 1)
        return out
    if isinstance(value, list) and value and all(isinstance(x, dict) for x in value):
        out = [f"{pad}{key}:"]
        for x in value:  # YAML-like: the first field on the "- " line
            item = [ln for k, v in x.items() for ln in _lines(str(k), v, depth + 2)]
            out += [f"{pad}  - {item[0].lstrip()}"] + item[1:]
        return out
    if isinstance(value, list):
        if not value:
            return [f"{pad}{key}: none"]
        return [f"{pad}{key}:"] + [f"{pad}  - {x}" for x in value]
    return [f"{pad}{key}: {value}"]


def write_json(plan: dict, path: str | Path) -> Path:
    p = Path(path)
    p.write_text(json.dumps(plan, indent=1, default=str))
    return p
