"""`cglab data stream`: what a run will read, sample by sample — each sample's unit of work, objective, tokens per
source and the documents it holds (source, file, record) — with a summary (token share per source, files and
documents touched). It runs the training stream itself (`iter_train_batches` over the prepared corpus) for one DP
rank of the configured layout, so what it prints is what that rank trains on."""

from __future__ import annotations

from collections import Counter

import numpy as np

from cglab.data import readers
from cglab.data.contract import OBJECTIVES
from cglab.data.pipeline import DataPlan, iter_train_batches, mix_dataset


def unit_documents(plan: DataPlan, epoch: int, unit: int) -> tuple[np.ndarray, np.ndarray]:
    """(keys, sources) of a unit's documents in stream order: a sample's doc_first..doc_last index into them."""
    rows = mix_dataset(plan, epoch, units=[unit]).select_columns(["key", "source"]).take_all()
    return np.array([r["key"] for r in rows], np.int64), np.array([r["source"] for r in rows], np.int32)


def stream_samples(cfg, plan: DataPlan, samples: int, rank: int = 0, epoch: int = 0) -> dict:
    """The first `samples` samples DP rank `rank` reads in `epoch` ({"samples": [...], "summary": {...}})."""
    dp = cfg.parallel.data_parallel_size
    if not 0 <= rank < dp:
        raise ValueError(f"--rank {rank} outside parallel.data_parallel_size={dp}")
    names = [s.name for s in plan.sources]
    units: dict[int, tuple[np.ndarray, np.ndarray]] = {}
    out, tokens, files, docs = [], np.zeros(len(names), np.int64), Counter(), set()
    batches = iter_train_batches(cfg, epoch, rank, dp, batch_size=min(64, samples), plan=plan, drop_last=False)
    for b in batches:
        for i in range(len(b["unit"])):
            u = int(b["unit"][i])
            if u not in units:
                units[u] = unit_documents(plan, epoch, u)
            keys, _ = units[u]
            held = []
            for key in keys[int(b["doc_first"][i]) : int(b["doc_last"][i]) + 1].tolist():
                s, f, r = readers.split_key(key)
                held.append({"source": names[s], "file": plan.sources[s].files[f], "record": r})
                files[(names[s], f)] += 1
                docs.add(key)
            st = b["source_tokens"][i]
            tokens += st
            out.append(
                {
                    "sample": len(out),
                    "epoch": epoch,
                    "rank": rank,
                    "unit": u,
                    "unit_index": int(b["unit_index"][i]),
                    "objective": OBJECTIVES[int(b["objective"][i])],
                    "tokens": int(st.sum()),
                    "loss_tokens": int(np.asarray(b["loss_mask"][i]).sum()),
                    "source_tokens": {n: int(t) for n, t in zip(names, st)},
                    "documents": held,
                }
            )
            if len(out) >= samples:
                return {"samples": out, "summary": _summary(plan, tokens, files, docs, out)}
    return {"samples": out, "summary": _summary(plan, tokens, files, docs, out)}


def _summary(plan: DataPlan, tokens: np.ndarray, files: Counter, docs: set, out: list) -> dict:
    total = int(tokens.sum())
    return {
        "samples": len(out),
        "tokens": {s.name: int(t) for s, t in zip(plan.sources, tokens)},
        "token_share": {s.name: round(float(t) / total, 4) if total else 0.0 for s, t in zip(plan.sources, tokens)},
        "planned_token_share": {s.name: round(w, 4) for s, w in zip(plan.sources, plan.weights)}
        if plan.mix_by == "tokens"
        else None,
        "files_touched": {
            s.name: f"{len({f for n, f in files if n == s.name})} of {len(s.files)}" for s in plan.sources
        },
        "documents": len(docs),
        "units": sorted({x["unit"] for x in out}),
    }


def text(report: dict) -> str:
    """One line a sample, then the summary."""
    lines = []
    for x in report["samples"]:
        srcs = ", ".join(f"{n} {t}" for n, t in x["source_tokens"].items() if t)
        held = " ".join(f"{d['source']}:{d['file'].rsplit('/', 1)[-1]}#{d['record']}" for d in x["documents"])
        lines.append(
            f"{x['sample']:>6} e{x['epoch']} unit {x['unit']}[{x['unit_index']}] {x['objective']:<5} "
            f"{x['tokens']} tok ({srcs}) docs: {held}"
        )
    s = report["summary"]
    lines.append(
        f"summary: {s['samples']} samples, token share {s['token_share']} (planned {s['planned_token_share']}), "
        f"files touched {s['files_touched']}, {s['documents']} documents, units {s['units']}"
    )
    return "\n".join(lines)
